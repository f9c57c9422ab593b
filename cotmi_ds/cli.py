"""`cotmi` — the command line. Subcommands are plain functions; Fire maps flags onto them."""
from __future__ import annotations

import sys
from pathlib import Path

import fire

from cotmi_ds.cluster.plan import PlanInputs, check_inputs
from cotmi_ds.config import TrainConfig, load_config
from cotmi_ds.errors import UsageError
from cotmi_ds.flags import describe_flags, parse_flags
from cotmi_ds.teacher.options import describe_teach_flags, parse_teach_flags
from cotmi_ds.training.stopping import RunStopped, StopRequest


def train(config: str | None = None, **flags):
    """Train a T5 student by chain-of-thought distillation under DeepSpeed.

    With no arguments: mode `mi` on the embedded synthetic dataset, with a small T5 built from a
    T5Config and a sentencepiece tokenizer trained on the fly (a few minutes on a laptop CPU).

    CONFIG is a preset name (see cotmi_ds/presets/) or a YAML/JSON file of flag: value pairs;
    flags override it. The settings that differ from the defaults are printed, and the resolved
    config is saved as <output_dir>/config.yaml.
    Multi-process: launch with `deepspeed` or `torchrun` (see docs/configuration.md).
    """
    return _train(config, flags)


def _train(config: str | None, flags: dict, faults=None):
    stop_request = StopRequest()  # a signal from here on ends the run cleanly, once it is set up
    # Standard library (and datasets, for your own data) only: what the flags and files decide fails
    # in a fraction of a second, before the seconds of importing torch, transformers and DeepSpeed.
    cfg = _check_data(load_config(config, **flags))
    from cotmi_ds.ds_configs import AUTO_DS_CONFIG, read_ds_config
    from cotmi_ds.model.hub import resolve_names
    from cotmi_ds.model.weights import check_weight_files

    if cfg.ds_config != AUTO_DS_CONFIG:
        read_ds_config(cfg.ds_config)
    resolve_names(cfg)
    if Path(cfg.model).expanduser().is_dir():
        check_weight_files(Path(cfg.model).expanduser(), "--model")
    from cotmi_ds.training.faults import NO_FAULTS
    from cotmi_ds.training.loop import run_training  # heavy imports only once the config is known to be valid

    run_training(cfg, faults or NO_FAULTS, stop_request)


train.__doc__ += "\n" + describe_flags(TrainConfig)


def _check_data(cfg):
    """The data's files found (and your own data's rows read and checked), without torch; the config
    as a run records it (data/datasets.py, check_data_files)."""
    from cotmi_ds.data import DATASETS
    from cotmi_ds.data.datasets import check_data_files

    cfg = check_data_files(cfg)
    if cfg.dataset not in DATASETS:
        from cotmi_ds.data.splits import build_splits

        build_splits(cfg)
    return cfg


def eval_cmd(checkpoint: str | None = None, output_dir: str | None = None, config: str | None = None, **flags):
    """Evaluate a saved student without training: accuracy, ECE and confidence on valid and test.

    --checkpoint DIR: a run directory (its config.yaml and exported model/; the data and settings
    are the run's; --eval_batch_size, --max_new_tokens, --eval_rationales, --max_target_length,
    --dist_timeout_s may be changed) or a Hugging Face T5 folder (config.json + weights; the dataset
    and other settings come from the train flags, e.g. --dataset synthetic, or --config).
    Writes eval_results.json and predictions/eval-{valid,test}.jsonl into --output_dir (default:
    the run directory, or DIR-eval beside a model folder, which is left as it was); a run's
    results.json is never touched.
    """
    from cotmi_ds.evaluation.command import eval_config, output_dir_for, resolve_checkpoint
    from cotmi_ds.model.hub import resolve_names

    ckpt = resolve_checkpoint(checkpoint)
    run_cfg, cfg = eval_config(ckpt, config, flags)
    resolve_names(cfg)  # a --tokenizer from the hub
    out = output_dir_for(ckpt, output_dir)
    from cotmi_ds.evaluation.command import run_eval  # heavy imports only once the inputs are known to be valid

    run_eval(ckpt, run_cfg, cfg, out)


def report(*run_dirs: str, metric: str = "best_valid", output_dir: str | None = None):
    """Results table from finished runs: one table per model, rows = modes (split by every setting
    of config.yaml that differs), columns = datasets, mean ± std over seeds. Printed, and written as
    report.md and report.csv into --output_dir (default: the current directory).

    --metric best_valid (default): test accuracy at the evaluation with the best valid accuracy;
    last: at the last evaluation; best_test: the highest test accuracy of any evaluation (the released
    code chooses no checkpoint: it logs the test accuracy every 250 steps);
    rationale_chrf, rationale_bleu: the test rationales' score at the best-valid evaluation.
    A directory that is not a finished run (no results.json, or one that does not read) is skipped
    with a warning naming it and why; none left is an error.
    """
    from cotmi_ds.evaluation.report import write_report

    markdown, md_path, csv_path = write_report(list(run_dirs), str(metric), output_dir,
                                               skipped=lambda line: print(f"warning: {line}", file=sys.stderr))
    print(markdown)
    print(f"wrote {md_path} and {csv_path}")


def bench_step(**flags):
    """Same-run benchmark: the trainer's step against the released training step (benchmarks/).

    Both sides train the same T5 with T5's real 32,128-token vocabulary and random weights on the
    same batches and precision, each in its own process, taking turns (A B A B). Prints samples/s,
    tokens/s, step ms, TFLOP/s, MFU (GPUs) and peak memory (RSS on CPU, GPU memory on GPUs) of
    both, and the ratios.
    """
    _benchmarks_module("step_bench").run(**flags)


def bench_loss(**flags):
    """Fused loss vs the plain reference, measured in one run (benchmarks/loss_bench.py; each figure
    in its own process).

    Prints two tables: the loss alone at T5-base shapes (time, peak memory above baseline) and a
    full MI training step of a tiny T5 with the real vocabulary (samples/s, peak RSS).
    On a GPU: cotmi bench loss --device cuda --dtype bf16 --batch 64
    """
    _benchmarks_module("loss_bench").run(**flags)


def bench_rationales(**flags):
    """dss vs mi (--mi_variant paper) vs mi (--mi_variant masked): test accuracy next to the rationale
    quality (BLEU/chrF against the teacher's, rationales beginning with "("), over seeds
    (benchmarks/rationale_grid.py; docs/method.md shows what it measured).
    """
    _benchmarks_module("rationale_grid").run(**flags)


def bench_memory(**flags):
    """Peak host memory per rank during set-up and during training, at several ZeRO stages and
    world sizes (CPU ranks under torchrun; benchmarks/memory_bench.py). The student is built as
    `cotmi train` builds it (partitioned at creation under ZeRO-3). Each cell also prints `cotmi
    plan`'s prediction of its training peak and the error. Needs several GiB per rank at t5-base size.
    """
    _benchmarks_module("memory_bench").run(**flags)


def bench_teach(**flags):
    """Is `cotmi teach` ever the bottleneck of a teacher server? Against one local `transformers serve`
    (a tiny random causal LM built on the fly, or --model DIR), the same chat requests from a minimal
    raw-HTTP request loop (the server's ceiling) and from the whole `cotmi teach` job, in turns, each
    in its own process: completions/s, their ratio, and each side's CPU time per 1,000 requests
    (benchmarks/teach_bench.py).
    """
    _benchmarks_module("teach_bench").run(**flags)


def bench_gpu(wheels: str | None = None, out: str = "gpu-check", dry_run: bool = False):
    """The one-shot GPU check (benchmarks/gpu_check.py): CUDA tests, bench loss and step, a 200-step
    bf16 run of a t5-v1_1-base-shaped student; writes OUT/summary.json, exit code 1 if a stage failed.
    --wheels DIR installs missing dependencies from a wheel folder first; --dry_run: CPU, tiny shapes.
    On a machine without the dependencies, run `python benchmarks/gpu_check.py --wheels DIR` instead."""
    module = _benchmarks_module("gpu_check")
    rc = module.check(Path(out).resolve(), Path(wheels) if wheels else None, bool(dry_run))
    if rc:
        sys.exit(rc)


BENCH = {"step": bench_step, "loss": bench_loss, "rationales": bench_rationales, "memory": bench_memory,
         "teach": bench_teach, "gpu": bench_gpu}


def _benchmarks_module(name: str):
    """benchmarks/NAME.py of this checkout (benchmarks are not part of the installed package)."""
    import importlib

    repo = Path(__file__).resolve().parent.parent
    if not (repo / "benchmarks" / f"{name}.py").is_file():
        raise UsageError("cotmi bench runs from a checkout of the repository (git clone, then "
                         "pip install -e .): this cotmi is installed without benchmarks/")
    sys.path.insert(0, str(repo))
    return importlib.import_module(f"benchmarks.{name}")


def _describe_bench_flags() -> None:
    """Each `cotmi bench` command's flags, from its options (benchmarks/options.py), into its help."""
    try:
        commands = _benchmarks_module("options").COMMANDS
    except UsageError:  # an installed cotmi: no benchmarks to describe
        return
    for name, options in commands.items():
        flags = describe_flags(options)
        if flags not in BENCH[name].__doc__:  # once, however often main() runs in one process
            BENCH[name].__doc__ += "\n" + flags


def export(checkpoint: str, out_dir: str, push_to_hub: str | None = None, private: bool = True):
    """Write a Hugging Face model (save_pretrained: config + safetensors, the tokenizer and a model
    card, README.md) from a checkpoint of any ZeRO stage and world size.

    CHECKPOINT is a run directory (its latest checkpoint), its checkpoints/ folder or one
    checkpoints/step-N folder. OUT_DIR must not exist or be empty; it appears only when complete.
    Load the result with AutoModelForSeq2SeqLM.from_pretrained(OUT_DIR).

    --push_to_hub NAMESPACE/NAME then uploads OUT_DIR to that Hub model repository (created private
    unless --private false), with huggingface_hub's credentials (HF_TOKEN or `hf auth login`).
    """
    if push_to_hub is not None:
        from cotmi_ds.checkpoint.upload import check_repo_id

        check_repo_id(str(push_to_hub))
    from cotmi_ds.checkpoint.export import export_checkpoint  # heavy imports only after the arguments parsed

    source = export_checkpoint(str(checkpoint), str(out_dir))
    print(f"exported {source} to {out_dir}", flush=True)
    if push_to_hub is not None:
        from cotmi_ds.checkpoint.upload import push

        print(f"uploaded {out_dir} to {push(Path(out_dir), str(push_to_hub), private=bool(private))}")


def sweep(grid: str, *, out: str | None = None, submit: bool = False, sbatch_args: str = "",
          max_parallel: int = 0, template: str | None = None, local: bool = False,
          gpus_per_cell: int | None = None, procs_per_cell: int = 1):
    """A grid of runs, one run directory per cell: a Slurm job array of the singlenode template, or
    (--local) queued on this machine without Slurm: `cotmi sweep grid.yaml --out runs/sweep1 --submit`.

    GRID is a YAML/JSON file with `fixed:` (flags of every cell) and `grid:` (flag: [values]; every
    combination is a cell); its format, with an example, is in docs/slurm.md ("The paper's grid").
    Every cell's flags are checked before anything is written. --out DIR, the sweep directory, holds
    cells/, runs/<cell name>/ and logs/; cells already finished are skipped, so the same command
    resubmits (or resumes) what is left.

    Slurm: without --submit the sbatch command is only printed.
    --sbatch_args="--partition gpu --gpus-per-node 1 --time 12:00:00" passes resources to sbatch;
    --max_parallel N caps the running array tasks; --template NAME|FILE another batch script.
    Afterwards: cotmi report DIR/runs/*

    --local: the cells run here through torchrun, --gpus_per_cell N GPUs each (default 1 if there
    are GPUs; each cell sees only its own), or --procs_per_cell N CPU ranks each with
    --gpus_per_cell 0 or no GPU; as many at once as GPU groups fit (--max_parallel N caps it; on
    CPUs the default is 1). Interrupted cells continue from their checkpoints when the command is
    run again. When all have finished, report.md and report.csv are written into the sweep directory.
    """
    if out is None or out is True or str(out).strip() == "":
        raise UsageError("cotmi sweep needs --out DIR, the sweep directory (e.g. cotmi sweep grid.yaml --out "
                         "runs/sweep1)")
    if local:
        if submit:
            raise UsageError("--local runs the cells here; --submit is for Slurm")
        from cotmi_ds.cluster.local import run_local

        if run_local(str(grid), str(out), None if gpus_per_cell is None else int(gpus_per_cell),
                     int(procs_per_cell), int(max_parallel)):
            sys.exit(1)
        return
    from cotmi_ds.cluster.sweep import run_sweep

    run_sweep(str(grid), str(out), bool(submit), str(sbatch_args), int(max_parallel), template)


def plan(model: str = "", **flags):
    """Memory per GPU of each DeepSpeed option (ZeRO 0-3, CPU offload of the optimizer and of the
    weights), with and without activation checkpointing, and the cheapest configuration that fits.
    How it is computed: docs/scale.md.
    """
    inputs = check_inputs(parse_flags(PlanInputs, {"model": model, **flags}, "cotmi plan"))
    from cotmi_ds.cluster.plan import plan as make_plan  # heavy imports only once the flags are valid

    print(make_plan(inputs), flush=True)


plan.__doc__ += "\n" + describe_flags(PlanInputs)


def doctor(config: str | None = None, ranks: int | None = None, gpus: int | None = None,
           nodes: int | None = None, wait_s: float = 60, **flags):
    """Preflight check of this node for the `cotmi train` run with the same CONFIG and flags: torch
    and CUDA, GPUs seen vs asked for, bf16, NCCL, the DeepSpeed ops the config needs, the model (local,
    cached, or downloadable), the data, the run directory (writable; the same on every node) and free
    disk for its checkpoints. One line per check; a failing one says how to fix it. Exit code 1 if any
    failed. The Slurm templates run it on every node before launching.

    --gpus N (default: $SLURM_GPUS_ON_NODE, else the GPUs torch sees), --ranks N per node (default:
    one per GPU, else 1), --nodes N (default: $SLURM_NNODES, else 1; several nodes wait up to
    --wait_s seconds to see each other's marker files in the run directory)."""
    cfg = load_config(config, **flags)
    from cotmi_ds.cluster.doctor import doctor as run

    if run(cfg, ranks, gpus, nodes, float(wait_s)):
        sys.exit(1)


def slurm_template(name: str | None = None):
    """Print a shipped Slurm batch script, to copy and edit: `cotmi slurm template multinode > job.sbatch`.
    NAME: multinode (several nodes, torchrun), singlenode (one node, one rank per GPU) or teach (a
    teacher server on the job's GPUs and `cotmi teach` against it); without NAME the names are
    listed. See docs/slurm.md."""
    from cotmi_ds.cluster.templates import template_names, template_path

    if name is None:
        print("\n".join(template_names()))
        return
    sys.stdout.write(template_path(str(name)).read_text())


def ds_config(name: str | None = None):
    """Print a shipped DeepSpeed config, to copy and edit: `cotmi ds_config zero3 > my.json`, then
    `cotmi train --ds_config my.json`. Without NAME the names are listed."""
    from cotmi_ds.ds_configs import ds_config_names, read_ds_config

    if name is None:
        print("\n".join(ds_config_names()))
        return
    sys.stdout.write(Path(read_ds_config(str(name))[1]).read_text())


def data_stats(config: str | None = None, **flags):
    """Per split of a dataset: rows, rows excluded, teacher outputs that fell back to the
    placeholder label, the teacher's label accuracy against gold, and token-length percentiles of
    inputs, labels and rationales. Takes the flags of `cotmi train` (--dataset, --data_root,
    --tokenizer, --mode, --label_type, --subsample, --seed, ...), e.g.
    `cotmi data stats --dataset cqa --data_root datasets`."""
    cfg = load_config(config, **flags)
    from cotmi_ds.data.stats import dataset_stats

    print(dataset_stats(cfg), flush=True)


def data_prepare(config: str | None = None, **flags):
    """Build (or find) the tokenized splits a `cotmi train` with the same flags will use, in the
    on-disk cache, and print how long that took: run it once before launching many ranks."""
    cfg = _check_data(load_config(config, **flags))
    import torch

    from cotmi_ds.console import quiet_libraries
    from cotmi_ds.data.pipeline import prepare_data
    from cotmi_ds.distributed import DistEnv

    env = DistEnv(0, 0, 1, 1, torch.device("cpu"))
    quiet_libraries(env)
    data = prepare_data(cfg, env)
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
    from cotmi_ds.data.release import fetch

    # Fire turns `--to 123` into an int: every value here is a path or a URL.
    print(fetch(str(to), archive=None if archive is None else str(archive), url=None if url is None else str(url)),
          flush=True)


def teach(**flags):
    """A teacher LLM's chain of thought for a dataset, checked against gold and filtered, written as
    OUT/{train,valid,test}.jsonl for `cotmi train --dataset OUT`, with OUT/manifest.json (teacher,
    prompt and decoding settings and their hash, the teacher's accuracy per split, rows kept and
    dropped and why). Answers are cached in OUT/cache.jsonl as they arrive: the same command run
    again after an interruption asks only what is missing. Exit codes: 0 done, 2 bad input (one
    line, nothing written), 75 stopped (SIGTERM/SIGINT, or no teacher answered): run it again.
    See docs/teacher.md, e.g.
    `cotmi teach --dataset questions.jsonl --task choice --out teach/ --base_url http://localhost:8000/v1`
    """
    opts = parse_teach_flags(flags)
    from cotmi_ds.teacher.job import run  # heavy imports only once the flags are valid

    run(opts)


teach.__doc__ += "\n" + describe_teach_flags()


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


def main(argv: list[str] | None = None, faults=None) -> None:
    """``faults``: a ``cotmi_ds.training.faults.Faults`` the train command hands to the trainer
    (fault-injection tests, or a wrapper of your own)."""
    argv = _drop_launcher_args(sys.argv[1:] if argv is None else list(argv))
    if "--help" in argv or "-h" in argv:  # Fire reads a bare --help as a flag of train(**flags)
        argv = [a for a in argv if a not in ("--help", "-h")] + ["--", "--help"]
        if argv[:1] == ["bench"]:
            _describe_bench_flags()
    try:
        def train_with_faults(config: str | None = None, **flags):
            return _train(config, flags, faults)

        train_with_faults.__doc__ = train.__doc__
        fire.Fire({"train": train if faults is None else train_with_faults, "eval": eval_cmd, "report": report, "export": export, "sweep": sweep, "plan": plan,
                   "teach": teach, "slurm": {"template": slurm_template}, "ds_config": ds_config, "doctor": doctor,
                   "data": {"stats": data_stats, "prepare": data_prepare, "fetch": data_fetch},
                   "bench": BENCH}, command=argv, name="cotmi")
    except UsageError as e:
        print(f"cotmi: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunStopped as e:  # preempted (75), too many non-finite losses (3), a full disk (2): stopping.py
        if e.show:
            print(f"cotmi: {'error: ' if e.exit_code == 2 else ''}{e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
