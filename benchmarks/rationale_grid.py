"""`cotmi bench rationales`: what the MI term does to the student's explanations, re-measured.

Trains dss, mi with ``--mi_variant paper`` and mi with ``--mi_variant masked`` (the trainer's own
``cotmi train``, one process per run, seeds in the outer loop so that a partial grid still covers
every method), then tabulates, per method over seeds:

- test accuracy at the evaluation with the best valid accuracy (what ``cotmi report`` shows);
- the test rationales' BLEU and chrF against the teacher's at that evaluation (results.json,
  scored by cotmi_ds/evaluation/rationale.py on the first ``--rationales`` test examples);
- how many of those rationales begin with "(" (the first token of every synthetic/SVAMP label)
  and how many contain one at all (the teacher's never do on the synthetic set).

Runs already finished in ``--out`` are reused, so the same command continues an interrupted grid.
Any ``cotmi train`` flag can be added with ``--train_args "--dataset svamp --data_root datasets"``.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.options import RationaleOptions
from cotmi_ds.errors import UsageError
from cotmi_ds.flags import parse_flags

REPO = Path(__file__).resolve().parent.parent
METHODS = (("dss", None), ("mi", "paper"), ("mi", "masked"))


def _label(mode: str, variant: str | None) -> str:
    return mode if variant is None else f"{mode}-{variant}"


def _items(value: str) -> list[str]:
    return [v for v in value.replace(" ", "").split(",") if v]


def _parse(flags: dict) -> dict:
    opts = asdict(parse_flags(RationaleOptions, flags, "cotmi bench rationales"))
    seeds = _items(opts["seeds"])
    if not seeds or not all(s.isdigit() for s in seeds):
        raise UsageError(f"--seeds {opts['seeds']!r}: expected comma-separated whole numbers")
    opts["seeds"] = [int(s) for s in seeds]
    known = {_label(m, v): (m, v) for m, v in METHODS}
    methods = _items(opts["methods"])
    bad = [m for m in methods if m not in known]
    if bad:
        raise UsageError(f"--methods {bad[0]!r} is not one of: {', '.join(known)}")
    opts["methods"] = [known[m] for m in methods]
    return opts


def train_one(out: Path, mode: str, variant: str | None, seed: int, opts: dict) -> Path:
    """One finished run directory (trained now, or found finished from an earlier call)."""
    run = out / f"{_label(mode, variant)}-seed{seed}"
    if (run / "results.json").is_file():
        return run
    args = [sys.executable, "-m", "cotmi_ds", "train", "--mode", mode, "--seed", str(seed),
            "--max_steps", str(opts["steps"]), "--eval_rationales", str(opts["rationales"]),
            "--output_dir", str(run), "--overwrite", "true", *shlex.split(opts["train_args"])]
    if variant is not None:
        args += ["--mi_variant", variant]
    print("$ " + " ".join(shlex.quote(a) for a in args[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{run}: training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {proc.stdout.strip().splitlines()[-1]}\n  ({time.perf_counter() - t0:.0f} s wall)", flush=True)
    return run


def run_figures(run: Path) -> dict:
    """The figures of one finished run, at its best-valid evaluation."""
    results = json.loads((run / "results.json").read_text())
    step = results["step_at_best_valid"]
    rows = [json.loads(line) for line in
            (run / "predictions" / f"step{step:06d}-test.jsonl").read_text().splitlines()]
    rationales = [r["rationale"] for r in rows if r["rationale"] is not None]
    return {"accuracy": results["accuracy_at_best_valid"], "step": step,
            "bleu": results.get("rationale_bleu_at_best_valid"), "chrf": results.get("rationale_chrf_at_best_valid"),
            "n": len(rationales), "starts_paren": sum(r.lstrip().startswith("(") for r in rationales),
            "has_paren": sum("(" in r for r in rationales)}


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f}" if round(lo, 1) == round(hi, 1) else f"{lo:.1f}–{hi:.1f}"


def table(figures: dict[str, list[dict]]) -> str:
    lines = ["| method | test accuracy at best valid, % (mean ± sd, n) | rationale BLEU | rationale chrF "
             "| rationales beginning with `(` | rationales containing `(` |", "|---|---|---|---|---|---|"]
    for label, runs in figures.items():
        accs = [100 * f["accuracy"] for f in runs]
        acc = f"{statistics.fmean(accs):.1f}" + (f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else "")
        per_seed = ", ".join(f"{f['starts_paren']}/{f['n']}" for f in runs)
        contains = ", ".join(f"{f['has_paren']}/{f['n']}" for f in runs)
        lines.append(f"| {label} | {acc} (n={len(accs)}) | {_range([f['bleu'] for f in runs])} "
                     f"| {_range([f['chrf'] for f in runs])} | {per_seed} | {contains} |")
    return "\n".join(lines)


def run(**flags) -> str:
    opts = _parse(flags)
    out = Path(str(opts["out"])).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[dict]] = {_label(m, v): [] for m, v in opts["methods"]}
    for seed in opts["seeds"]:
        for mode, variant in opts["methods"]:
            figures[_label(mode, variant)].append(run_figures(train_one(out, mode, variant, seed, opts)))
    md = (f"{opts['steps']} steps, seeds {', '.join(map(str, opts['seeds']))}, rationales of the first "
          f"{opts['rationales']} test examples; extra train flags: {opts['train_args'] or 'none'}; "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs\n\n{table(figures)}\n")
    (out / "table.md").write_text(md)
    print(md + f"\nwrote {out / 'table.md'}; the accuracy table: cotmi report {out}/*-seed*", flush=True)
    return md
