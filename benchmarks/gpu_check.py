"""One-shot GPU check, from a fresh checkout on a machine with one GPU and no network:

    python benchmarks/gpu_check.py --wheels WHEELS [--out gpu-check]

1. installs what is missing (`pip install --no-index --find-links WHEELS -e .[test]`; torch,
   transformers, sentencepiece and tensorboard are expected preinstalled and are kept);
2. the CUDA tests (tests/cuda: fused loss vs reference in bf16 and fp32, values and gradients;
   torch's fused AdamW in the DeepSpeed engine);
3. `cotmi bench loss --device cuda --dtype bf16 --batch 64`;
4. `cotmi bench step --gpu`, and `cotmi bench step --gpu --lengths cqa` (CommonsenseQA's lengths:
   the released step against each lever: length grouping, SDPA attention, torch.compile);
5. a 200-step bf16 `cotmi train` of a t5-v1_1-base-shaped student (random weights; a sentencepiece
   tokenizer trained on the synthetic data), reporting samples/s, MFU and peak GPU memory.
Writes OUT/summary.json (every stage: ok, exit code, seconds, log, figures) and exits 1 if any
stage failed.

WHEELS is made once, on a machine with network and the GPU machine's Python version:

    python benchmarks/gpu_check.py --prepare_wheels WHEELS

(a wheel of deepspeed built from its source release, plus wheels of every other dependency that is
not preinstalled). `--dry_run` runs every stage on CPU with tiny shapes (the tests do, so that this
script keeps working).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREINSTALLED = {"torch", "transformers", "sentencepiece", "tensorboard"}
NEEDED_MODULES = ("deepspeed", "datasets", "fire", "yaml", "tqdm", "numpy", "pytest", "hypothesis")
DEEPSPEED = "deepspeed==0.19.8"


def _requirement_name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep)[0]
    return req.strip().lower()


def prepare_wheels(dest: Path) -> int:
    """deepspeed's wheel (built: it has no wheel on PyPI) and wheels of the other dependencies, with
    theirs, except the preinstalled ones (deepspeed's dependency on torch is left out on purpose)."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), DEEPSPEED], check=True)
    wheel = next(dest.glob("deepspeed-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    ds_reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = project["dependencies"] + project["optional-dependencies"]["test"]
    reqs = [r for r in ds_reqs + ours + ["setuptools>=68", "wheel"] if "extra ==" not in r
            and _requirement_name(r) not in PREINSTALLED | {"deepspeed"}]
    subprocess.run([*pip, "download", "--only-binary=:all:", "-d", str(dest), *reqs], check=True)
    print(f"wheels in {dest}: copy it to the GPU machine, then: python benchmarks/gpu_check.py --wheels {dest}")
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
    """samples/s, MFU and peak memory over the logged steps (the first log interval, which includes
    warm-up, left out when there are more)."""
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
    return {"samples_per_s": mean("throughput/samples_per_s"), "mfu_pct": mean("throughput/mfu_pct"),
            "peak_memory_gib": round(peak, 3), "optimizer": ds.get("optimizer", {}).get("params", {})}


def make_student(out: Path, dry_run: bool) -> Path:
    """A t5-v1_1-base-shaped T5 with random weights and a sentencepiece tokenizer trained on the
    synthetic data, saved as a model folder (no hub on the GPU machine). Dry run: tiny shapes."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from cotmi_ds.data.synthetic import synthetic_splits
    from cotmi_ds.data.tokenizer import tokenizer_from_sentencepiece, train_sentencepiece

    rows = synthetic_splits(2000, 10, seed=0)["train"]
    texts = [p + r["input"] for r in rows for p in ("predict: ", "explain: ")]
    tok = tokenizer_from_sentencepiece(train_sentencepiece(texts + [r["rationale"] for r in rows], 256))
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
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, dry_run)
    py = sys.executable
    missing = _missing_modules()
    if missing or not dry_run:
        if wheels is None and missing:
            print(f"missing {', '.join(missing)}: pass --wheels DIR (see --prepare_wheels)", file=sys.stderr)
            return 2
        if wheels is not None:
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
                   "none,group,sdpa", "--precision", "bf16", "--steps", "2", "--rounds", "1", "--warmup_steps", "1"]
        train = ["--max_steps", "4", "--log_every", "2", "--batch_size", "4", "--synthetic_train_size", "64",
                 "--synthetic_eval_size", "8", "--max_new_tokens", "8", "--precision", "fp32"]
    else:
        loss = ["--device", "cuda", "--dtype", "bf16", "--batch", "64"]
        step = ["--gpu"]
        lengths = ["--gpu", "--lengths", "cqa"]
        train = ["--max_steps", "200", "--log_every", "20", "--batch_size", "64", "--precision", "bf16",
                 "--synthetic_eval_size", "64", "--eval_batch_size", "64"]
    stages.run("bench_loss", [*cotmi, "bench", "loss", *loss], 600, **env)
    stages.run("bench_step", [*cotmi, "bench", "step", *step], 600, **env)
    stages.run("bench_step_lengths", [*cotmi, "bench", "step", *lengths], 600, **env)
    student = out / "student"  # in its own process: what the install stage added is importable there
    made = stages.run("student", [py, str(Path(__file__).resolve()), "--make_student", str(student),
                                  *(["--dry_run"] if dry_run else [])], 300, PYTHONPATH=str(REPO))
    if made["ok"]:
        run = out / "train-run"
        result = stages.run("train", [*cotmi, "train", "--model", str(student), "--tokenizer", str(student),
                                      "--eval_every", "0", "--output_dir", str(run), "--overwrite", "true",
                                      *train], 900, **env)
        if result["ok"]:
            result.update(_train_figures(run))
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
    parser.add_argument("--make_student", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_student:
        make_student(args.make_student, args.dry_run)
        return 0
    if args.prepare_wheels:
        return prepare_wheels(args.prepare_wheels)
    return check(args.out.resolve(), args.wheels, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
