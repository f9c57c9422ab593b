"""`cotmi report RUN_DIR...`: the paper-style results table from finished runs.

One table per student model; rows are training modes, columns are datasets; each cell is the test
accuracy in percent, mean ± sample standard deviation over seeds, with the number of seeds. Runs of one
mode that differ in another setting (α, β, label type, subsample, steps) get separate rows, labelled by
what differs; two runs of the same configuration and seed are an error. The accuracy is chosen with
``--metric`` (results.py): ``best_valid`` (default), ``last`` or ``best_test``.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from cotmi_ds.config import UsageError
from cotmi_ds.modes import MODES
from cotmi_ds.evaluation.results import METRIC_KEYS, select_accuracies

MODE_ORDER = tuple(MODES)
DATASET_ORDER = ("esnli", "anli1", "cqa", "svamp", "synthetic")  # the paper's column order, then ours
SETTINGS = ("label_type", "subsample", "alpha", "beta", "steps")
SETTING_DEFAULTS = {"label_type": "gt", "subsample": 1.0}
METRIC_TEXT = {
    "best_valid": "test accuracy at the evaluation with the best valid accuracy",
    "last": "test accuracy at the last evaluation",
    "best_test": "highest test accuracy of any evaluation (the released code chooses no checkpoint: "
                 "it logs the test accuracy every 250 steps)",
}


def _ordered(values, order) -> list:
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in order)


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a finished run, or None."""
    if not path.is_dir():
        return "no such directory"
    file = path / "results.json"
    if not file.is_file():
        return "no results.json"
    try:
        results = json.loads(file.read_text())
    except ValueError:
        return "results.json is not valid JSON"
    if not isinstance(results, dict):
        return "results.json is not a JSON object"
    for key in ("dataset", "model", "mode", "seed", "evaluations"):
        if key not in results:
            return f"results.json has no {key!r}"
    try:
        select_accuracies(results["evaluations"])
    except (ValueError, KeyError, TypeError):
        return "results.json has no usable evaluations"
    return None


def load_runs(run_dirs: list[str]) -> list[dict[str, Any]]:
    """Every directory's results.json, or one UsageError naming each directory that is not a run."""
    if not run_dirs:
        raise UsageError("cotmi report needs one or more run directories (each holding a results.json)")
    paths = [Path(str(d)).expanduser() for d in run_dirs]
    bad = [(p, why) for p in paths if (why := _problem(p)) is not None]
    if bad:
        raise UsageError("not finished runs: " + "; ".join(f"{p} ({why})" for p, why in bad))
    runs = []
    for p in paths:
        results = json.loads((p / "results.json").read_text())
        results["_dir"] = str(p)
        for key, default in SETTING_DEFAULTS.items():
            results.setdefault(key, default)
        runs.append(results)
    return runs


def _cell(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def build_report(runs: list[dict[str, Any]], metric: str) -> tuple[str, str]:
    """(Markdown, CSV) for runs loaded by ``load_runs``."""
    if metric not in METRIC_KEYS:
        raise UsageError(f"--metric {metric!r} is not one of: {', '.join(METRIC_KEYS)}")
    key = METRIC_KEYS[metric]
    # Settings that differ between runs of one mode on one dataset split that mode into rows;
    # a setting that differs only between datasets (say, steps) does not.
    varying: dict[tuple, set[str]] = defaultdict(set)  # (model, mode) -> setting names
    values: dict[tuple, set] = defaultdict(set)
    for run in runs:
        for s in SETTINGS:
            values[(str(run["model"]), run["mode"], run["dataset"], s)].add(run.get(s))
    for (model, mode, _, s), seen in values.items():
        if len(seen) > 1:
            varying[(model, mode)].add(s)
    # model -> (mode, ((setting, value), ...)) -> dataset -> seed -> (accuracy, run)
    table: dict[str, dict[tuple, dict[str, dict[Any, tuple[float, dict]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    for run in runs:
        model = str(run["model"])
        row = (run["mode"], tuple((s, run.get(s)) for s in SETTINGS if s in varying[(model, run["mode"])]))
        seeds = table[model][row][run["dataset"]]
        if run["seed"] in seeds:
            raise UsageError(f"{seeds[run['seed']][1]['_dir']} and {run['_dir']} are the same configuration "
                             f"and seed ({run['seed']}); pass only one of them")
        seeds[run["seed"]] = (select_accuracies(run["evaluations"])[key], run)

    md = [f"# Results: {METRIC_TEXT[metric]} (`--metric {metric}`, results.json `{key}`)", "",
          "Test accuracy in %, mean ± sample standard deviation over seeds (n = number of seeds).", ""]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "mode", *SETTINGS, "dataset", "metric", "n_seeds", "mean_pct", "std_pct",
                     "seeds", "runs"])
    for model in sorted(table):
        rows = table[model]
        datasets = _ordered({d for cells in rows.values() for d in cells}, DATASET_ORDER)
        md += [f"## {model}", "", "| mode | " + " | ".join(datasets) + " |",
               "|---|" + "---|" * len(datasets)]
        modes = _ordered({mode for mode, _ in rows}, MODE_ORDER)
        for mode in modes:
            for row in sorted((r for r in rows if r[0] == mode), key=lambda r: str(r[1])):
                label = mode + (" (" + ", ".join(f"{k}={v}" for k, v in row[1]) + ")" if row[1] else "")
                cells = []
                for dataset in datasets:
                    seeds = rows[row].get(dataset)
                    if not seeds:
                        cells.append("–")
                        continue
                    accs = [100 * acc for acc, _ in seeds.values()]
                    mean, std = _cell(accs)
                    cells.append(f"{mean:.2f} ± {std:.2f} (n={len(accs)})" if std is not None
                                 else f"{mean:.2f} (n=1)")
                    first = next(iter(seeds.values()))[1]  # the cell's runs share every setting
                    writer.writerow([model, mode, *(first.get(k) for k in SETTINGS), dataset, metric,
                                     len(accs), f"{mean:.4f}", "" if std is None else f"{std:.4f}",
                                     " ".join(str(s) for s in sorted(seeds, key=str)),
                                     " ".join(r["_dir"] for _, r in seeds.values())])
                md.append(f"| {label} | " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md), out.getvalue()


def write_report(run_dirs: list[str], metric: str, output_dir: str | None) -> tuple[str, Path, Path]:
    """Build the tables and write report.md and report.csv into ``output_dir`` (atomically)."""
    if metric not in METRIC_KEYS:
        raise UsageError(f"--metric {metric!r} is not one of: {', '.join(METRIC_KEYS)}")
    runs = load_runs(run_dirs)
    markdown, table_csv = build_report(runs, metric)
    out = Path(str(output_dir or ".")).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "report.md", out / "report.csv"
    for path, text in zip(paths, (markdown, table_csv)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return markdown, *paths
