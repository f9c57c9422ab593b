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
    from .data.benchmarks import check_data_files  # standard library only: fails fast

    check_data_files(cfg)
    from .train import run_training  # heavy imports only once the config is known to be valid

    run_training(cfg)


train.__doc__ += "\nFlags:\n" + describe_flags()


def data_stats(config: str | None = None, **flags):
    """Per split of a dataset: rows, rows excluded, teacher outputs that fell back to the
    placeholder label, the teacher's label accuracy against gold, and token-length percentiles of
    inputs, labels and rationales. Takes the flags of `cotmi train` (--dataset, --data_root,
    --tokenizer, --mode, --label_type, --subsample, --seed, ...), e.g.
    `cotmi data stats --dataset cqa --data_root datasets`."""
    cfg = load_config(config, **flags)
    from .data.stats import dataset_stats

    print(dataset_stats(cfg), flush=True)


def data_prepare(config: str | None = None, **flags):
    """Build (or find) the tokenized splits a `cotmi train` with the same flags will use, in the
    on-disk cache, and print how long that took: run it once before launching many ranks."""
    cfg = load_config(config, **flags)
    from .data.benchmarks import check_data_files

    check_data_files(cfg)
    import torch

    from .data.pipeline import prepare_data
    from .distributed import DistEnv

    data = prepare_data(cfg, DistEnv(0, 0, 1, 1, torch.device("cpu")))
    print(data.summary.describe(), flush=True)
    print(f"prepared in {data.seconds:.2f} s (tokenized-data cache: {data.cache_status}); "
          f"{', '.join(f'{k} {len(v):,}' for k, v in data.splits.items())} rows", flush=True)


def data_fetch(to: str = "datasets", archive: str | None = None, url: str | None = None, **unknown):
    """Download DSS's release archive (datasets.zip), verify it (git blob id, then the SHA-256 of
    every file whose sum is known) and unpack it into TO (default ./datasets, where `cotmi train`
    looks). --archive FILE uses a copy already on disk; --url a mirror."""
    if unknown:
        raise UsageError(f"unknown flag --{next(iter(unknown))} for `cotmi data fetch` (its flags: --to, "
                         "--archive, --url)")
    from .data.release import fetch

    print(fetch(to, archive=archive, url=url), flush=True)


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
        fire.Fire({"train": train, "data": {"stats": data_stats, "prepare": data_prepare, "fetch": data_fetch}},
                  command=argv, name="cotmi")
    except UsageError as e:
        print(f"cotmi: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
