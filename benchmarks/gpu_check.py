"""One-shot GPU check, from a fresh checkout on a machine with one GPU and no network:

    python benchmarks/gpu_check.py --wheels WHEELS [--out gpu-check]

1. checks that WHEELS was made for this machine (its Python version, every wheel's platform tags;
   one line and exit 2 if not), then installs what is missing from it (`pip install --no-index
   --find-links WHEELS -e .[test]`; torch is expected preinstalled and is kept);
2. the CUDA tests (tests/cuda: fused loss vs reference in bf16 and fp32, values and gradients;
   torch's fused AdamW in the DeepSpeed engine);
3. `cotmi bench loss --device cuda --dtype bf16 --batch 64`;
4. `cotmi bench step --gpu` (with the project step's time split and its host waits), and
   `cotmi bench step --gpu --lengths cqa` (CommonsenseQA's lengths: the released step against each
   lever: length grouping, SDPA attention, torch.compile);
5. the host waits of the trainer's own steps at default flags (benchmarks/host_syncs.py);
6. a 200-step `cotmi train` of a t5-v1_1-base-shaped student at default flags (bf16, ZeRO-0; random
   weights, a sentencepiece tokenizer trained on the synthetic data) with settings that train it
   stably (TRAIN_LR, TRAIN_WARMUP), reporting samples/s, MFU, the step's time split and peak GPU memory.
Writes OUT/summary.json (every stage: ok, exit code, seconds, log, figures) and exits 1 if any
stage failed.

WHEELS is made once, on a machine with network, for the GPU machine's Python and platform:

    python benchmarks/gpu_check.py --prepare_wheels WHEELS --python_version 3.11 --platform manylinux_2_28_x86_64

(benchmarks/wheel_folder.py: deepspeed's wheel built from its source release, and wheels of every
other requirement, torch and its CUDA libraries excepted). `--dry_run` runs every stage on CPU with
tiny shapes (the tests do, so that this script keeps working); with `--wheels` it checks the folder
against this machine and installs nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/gpu_check.py` from a checkout
from benchmarks import wheel_folder  # noqa: E402  (standard library only)

REPO = Path(__file__).resolve().parent.parent
# The training stage: default flags (bf16 at ZeRO-0 on one GPU) but the learning rate. The scratch
# default 3e-3 suits the 0.3M-parameter demo model, not a randomly initialised t5-base, which it can
# drive to NaN in bf16; AdamW at 1e-4 after 20 warm-up steps, clipped at 1.0 (the default), is the
# usual setting for a model of this size.
TRAIN_LR, TRAIN_WARMUP = "1e-4", 20
NEEDED_MODULES = ("deepspeed", "transformers", "datasets", "fire", "yaml", "tqdm", "numpy", "pytest", "hypothesis")


def prepare_wheels(dest: Path, python_version: str | None, platforms: list[str] | None,
                   torch_version: str | None) -> int:
    if not python_version or not platforms:
        mine = wheel_folder.this_machine()
        print(f"gpu_check: error: --prepare_wheels needs the GPU machine's --python_version and --platform "
              f"(this machine: --python_version {mine.python_version} --platform {mine.platforms[0]}; on the GPU "
              f"machine `python benchmarks/gpu_check.py --print_target` prints its own)", file=sys.stderr)
        return 2
    if torch_version is None:
        try:
            import torch
            torch_version = torch.__version__.split("+")[0]
        except ImportError:
            torch_version = "2.13.0"
    wheels = wheel_folder.prepare(dest, wheel_folder.Target(python_version, tuple(platforms)), REPO, torch_version)
    print(f"{len(wheels)} wheels in {dest} for Python {python_version} on {', '.join(platforms)}: copy it to the "
          f"GPU machine, then: python benchmarks/gpu_check.py --wheels {dest}")
    return 0


def _missing_modules() -> list[str]:
    return [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]


class Stages:
    def __init__(self, out: Path, dry_run: bool):
        self.out, self.dry_run, self.results = out, dry_run, {}

    def run(self, name: str, cmd: list[str], timeout_s: int, **env: str) -> dict:
        log = self.out / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                                    env={**os.environ, **env}).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        result = {"ok": rc == 0, "exit_code": rc, "seconds": round(time.monotonic() - start, 1), "log": str(log),
                  "command": " ".join(cmd)}
        self.results[name] = result
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {name} ({result['seconds']} s; log {log})", flush=True)
        return result


def _train_figures(run: Path) -> dict:
    """samples/s, MFU, the step's time split (device time per phase on GPUs) and peak memory over the
    logged steps (the first log interval, which includes warm-up, left out when there are more), and
    the first and last logged loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]

    def values(tag):
        vals = [e.value for e in acc.Scalars(tag)] if tag in tags else []
        return vals[1:] if len(vals) > 1 else vals

    def mean(tag):
        vals = values(tag)
        return round(sum(vals) / len(vals), 3) if vals else None

    peak = max(values("memory/max_allocated_gib") or values("memory/peak_rss_gib") or [0.0])
    ds = json.loads((run / "ds_config.json").read_text())
    losses = [e.value for e in acc.Scalars("loss/total")] if "loss/total" in tags else []
    return {"samples_per_s": mean("throughput/samples_per_s"), "mfu_pct": mean("throughput/mfu_pct"),
            "step_ms": mean("time/step_ms"),
            "time_split_ms": {phase: mean(f"time/{phase}_ms") for phase in ("data_wait", "forward", "backward",
                                                                            "optimizer")},
            "loss_first_logged": losses[0] if losses else None, "loss_last_logged": losses[-1] if losses else None,
            "peak_memory_gib": round(peak, 3), "optimizer": ds.get("optimizer", {}).get("params", {})}


def make_student(out: Path, dry_run: bool) -> Path:
    """A t5-v1_1-base-shaped T5 with random weights and a sentencepiece tokenizer trained on the
    synthetic data, saved as a model folder (no hub on the GPU machine). Dry run: tiny shapes."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from datasets import Dataset

    from cotmi_ds.data.pipeline import tokenizer_texts
    from cotmi_ds.data.synthetic import synthetic_splits
    from cotmi_ds.data.tokenizer import tokenizer_from_sentencepiece, train_sentencepiece

    # the texts the trainer's own tokenizer learns from (labels included: they must spell back)
    train = Dataset.from_list(synthetic_splits(2000, 10, seed=0)["train"])
    tok = tokenizer_from_sentencepiece(train_sentencepiece(tokenizer_texts(train), 256))
    config = json.loads((REPO / "benchmarks" / "t5-v1_1-base.json").read_text())
    if dry_run:
        config.update(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2, vocab_size=512)
    config.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    folder = out
    T5ForConditionalGeneration(T5Config(**config)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def check(out: Path, wheels: Path | None, dry_run: bool) -> int:
    missing = _missing_modules()
    if wheels is None and missing:
        print(f"gpu_check: error: missing {', '.join(missing)}: pass --wheels DIR (see --prepare_wheels)",
              file=sys.stderr)
        return 2
    if wheels is not None:
        problem = wheel_folder.check(wheels)
        if problem is not None:  # before anything is installed or written
            print(f"gpu_check: error: {problem}", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, dry_run)
    py = sys.executable
    if wheels is not None and not dry_run:
        stages.run("install", [py, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                               "-e", ".[test]"], 600)
    device = "cpu" if dry_run else "cuda"
    env = {"DS_ACCELERATOR": "cpu"} if dry_run else {}
    stages.run("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda"], 600,
               COTMI_TEST_DEVICE=device, **env)
    cotmi = [py, "-m", "cotmi_ds"]
    if dry_run:
        tiny = out / "tiny-t5.json"
        tiny.write_text(json.dumps({"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 2, "num_layers": 2,
                                    "num_decoder_layers": 2, "vocab_size": 512, "feed_forward_proj": "gated-gelu",
                                    "tie_word_embeddings": False}))
        loss = ["--device", "cpu", "--batch", "2", "--vocab", "512", "--d_model", "32", "--rationale_len", "16",
                "--input_len", "16", "--repeats", "1", "--steps", "2"]
        step = ["--model_config", str(tiny), "--batch_size", "2", "--input_len", "16", "--rationale_len", "16",
                "--label_len", "4", "--precision", "bf16", "--steps", "1", "--rounds", "1", "--warmup_steps", "1"]
        lengths = ["--model_config", str(tiny), "--batch_size", "2", "--lengths", "cqa", "--levers",
                   "none,group,sdpa,flush", "--precision", "bf16", "--steps", "2", "--rounds", "1", "--warmup_steps", "1"]
        data = ["--batch_size", "4", "--synthetic_train_size", "64", "--synthetic_eval_size", "8",
                "--max_new_tokens", "8"]
        train = ["--max_steps", "4", "--log_every", "2", "--warmup_steps", "1", *data]
    else:
        loss = ["--device", "cuda", "--dtype", "bf16", "--batch", "64"]
        step = ["--gpu"]
        lengths = ["--gpu", "--lengths", "cqa"]
        data = ["--batch_size", "64", "--synthetic_eval_size", "64", "--eval_batch_size", "64"]
        train = ["--max_steps", "200", "--log_every", "20", "--warmup_steps", str(TRAIN_WARMUP), *data]
    stages.run("bench_loss", [*cotmi, "bench", "loss", *loss], 600, **env)
    stages.run("bench_step", [*cotmi, "bench", "step", *step], 600, **env)
    stages.run("bench_step_lengths", [*cotmi, "bench", "step", *lengths], 600, **env)
    student = out / "student"  # in its own process: what the install stage added is importable there
    made = stages.run("student", [py, str(Path(__file__).resolve()), "--make_student", str(student),
                                  *(["--dry_run"] if dry_run else [])], 300, PYTHONPATH=str(REPO))
    if made["ok"]:
        model = ["--model", str(student), "--tokenizer", str(student), "--eval_every", "0", "--overwrite", "true",
                 "--lr", TRAIN_LR]
        # Steps 1-3, 5-7 are neither log nor save steps: nothing of the trainer's may wait there.
        stages.run("host_syncs", [py, str(REPO / "benchmarks" / "host_syncs.py"), *model, *data, "--max_steps", "8",
                                  "--log_every", "4", "--save_every", "0", "--output_dir", str(out / "syncs-run")],
                   600, **env)
        run = out / "train-run"
        result = stages.run("train", [*cotmi, "train", *model, "--output_dir", str(run), *train], 900, **env)
        if result["ok"]:
            result.update(_train_figures(run))
            first, last = result["loss_first_logged"], result["loss_last_logged"]
            if not dry_run and not (first is not None and last is not None and last < first):
                result.update(ok=False, why=f"the loss did not fall over the run ({first} -> {last})")
    ok = all(r["ok"] for r in stages.results.values())
    summary = {"ok": ok, "dry_run": dry_run, "device": _device_name(), "stages": stages.results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'all stages passed' if ok else 'FAILED'}; summary: {out / 'summary.json'}", flush=True)
    return 0 if ok else 1


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown (torch missing)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install missing dependencies from")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="logs and summary.json (default gpu-check)")
    parser.add_argument("--dry_run", action="store_true", help="every stage on CPU with tiny shapes")
    parser.add_argument("--prepare_wheels", type=Path, metavar="DIR", help="make the wheel folder (needs network)")
    parser.add_argument("--python_version", help="with --prepare_wheels: the GPU machine's Python, e.g. 3.11")
    parser.add_argument("--platform", action="append", help="with --prepare_wheels: the GPU machine's platform tag, "
                        "e.g. manylinux_2_28_aarch64 (repeatable)")
    parser.add_argument("--torch_version", help="with --prepare_wheels: the torch the GPU machine has (default: "
                        "this machine's); only the resolution sees it, no torch is shipped")
    parser.add_argument("--print_target", action="store_true",
                        help="print this machine's --python_version and --platform for --prepare_wheels")
    parser.add_argument("--make_student", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_student:
        make_student(args.make_student, args.dry_run)
        return 0
    if args.print_target:
        mine = wheel_folder.this_machine()
        print(f"--python_version {mine.python_version} --platform {mine.platforms[0]}")
        return 0
    if args.prepare_wheels:
        return prepare_wheels(args.prepare_wheels, args.python_version, args.platform, args.torch_version)
    return check(args.out.resolve(), args.wheels, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
