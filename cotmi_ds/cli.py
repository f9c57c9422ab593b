"""`cotmi` — the command line. Subcommands are plain functions; Fire maps flags onto them."""
from __future__ import annotations

import sys

import fire

from .config import UsageError, describe_flags, load_config
from .stopping import RunStopped


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


def export(checkpoint: str, out_dir: str):
    """Write a Hugging Face model (save_pretrained: config + safetensors, and the tokenizer) from a
    checkpoint of any ZeRO stage and world size.

    CHECKPOINT is a run directory (its latest checkpoint), its checkpoints/ folder or one
    checkpoints/step-N folder. OUT_DIR must not exist or be empty; it appears only when complete.
    Load the result with T5ForConditionalGeneration.from_pretrained(OUT_DIR).
    """
    from .checkpoint import export_checkpoint  # heavy imports only after the arguments parsed

    source = export_checkpoint(str(checkpoint), str(out_dir))
    print(f"exported {source} to {out_dir}")


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
        fire.Fire({"train": train, "export": export}, command=argv, name="cotmi")
    except UsageError as e:
        print(f"cotmi: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunStopped as e:  # preempted (75) or too many non-finite losses (3): see stopping.py
        if e.show:
            print(f"cotmi: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
