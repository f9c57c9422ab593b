"""`cotmi` — the command line. Subcommands are plain functions; Fire maps flags onto them."""
from __future__ import annotations

import sys

import fire

from .config import UsageError, describe_flags, load_config


def train(config: str | None = None, **flags):
    """Train a T5 student by chain-of-thought distillation under DeepSpeed.

    With no arguments: mode `mi` on the embedded synthetic dataset, with a small T5 built from a
    T5Config and a sentencepiece tokenizer trained on the fly (a few minutes on a laptop CPU).

    CONFIG is a preset name (see cotmi_ds/presets/) or a YAML/JSON file of flag: value pairs;
    flags override it. The resolved config is printed and saved as <output_dir>/config.yaml.
    Multi-process: launch with `deepspeed` or `torchrun` (see README).
    """
    cfg = load_config(config, **flags)
    from .train import run_training  # heavy imports only once the config is known to be valid

    run_training(cfg)


train.__doc__ += "\nFlags:\n" + describe_flags()


def bench_loss(**flags):
    """Fused loss vs the plain reference, measured in one run (benchmarks/loss_bench.py; each figure
    in its own process).

    Prints two tables: the loss alone at T5-base shapes (time, peak memory above baseline) and a
    full MI training step of a tiny T5 with the real vocabulary (samples/s, peak RSS).

    Flags (defaults): --device cpu|cuda, --dtype fp32|bf16, --batch 8, --rationale_len 256,
    --label_len 8, --input_len 128, --vocab 32128, --d_model 768, --chunk_mib 0 (automatic),
    --mi_variant paper,
    --repeats 2 (processes per variant, alternating), --steps 3 (per process, the first untimed),
    --parts loss,train, --threads 0 (torch threads per process; 0: default).
    On a GPU: cotmi bench loss --device cuda --dtype bf16 --batch 64
    """
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if not (repo / "benchmarks" / "loss_bench.py").is_file():
        raise UsageError(f"cotmi bench needs a checkout of the repository: {repo / 'benchmarks'} not found")
    sys.path.insert(0, str(repo))
    from benchmarks.loss_bench import run

    run(**flags)


def _drop_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher inserts ``--local_rank=N`` before the subcommand; ranks are read
    from the environment (LOCAL_RANK), so the argument is dropped here."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = _drop_launcher_args(sys.argv[1:] if argv is None else list(argv))
    if "--help" in argv or "-h" in argv:  # Fire reads a bare --help as a flag of train(**flags)
        argv = [a for a in argv if a not in ("--help", "-h")] + ["--", "--help"]
    try:
        fire.Fire({"train": train, "bench": {"loss": bench_loss}}, command=argv, name="cotmi")
    except UsageError as e:
        print(f"cotmi: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
