"""`cotmi report RUN_DIR...`: the paper-style results table from finished runs.

One table per student model; rows are training modes, columns are datasets; each cell is a test
figure, mean ± sample standard deviation over seeds, with the number of seeds. Runs are told apart
by every training setting in their saved config.yaml: runs of one mode that differ in any of them
(mi_variant, lr, α, batch size, steps, ...) on one dataset get separate rows, labelled by exactly
the settings that differ; two runs identical in every setting and seed are an error. ``--metric``
(results.py) chooses the figure: test accuracy ``best_valid`` (default), ``last`` or ``best_test``,
or the test rationales' ``rationale_bleu`` / ``rationale_chrf`` at the best-valid evaluation.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from cotmi_ds.config import TrainConfig
from cotmi_ds.errors import UsageError
from cotmi_ds.evaluation.results import METRIC_KEYS, RESULTS, select_metrics
from cotmi_ds.files import read_json, read_yaml
from cotmi_ds.modes import MODES
from cotmi_ds.schema import problem

MODE_ORDER = tuple(MODES)
DATASET_ORDER = ("esnli", "anli1", "cqa", "svamp", "synthetic")  # the paper's column order, then ours
AXES = ("model", "mode", "dataset", "seed")  # the table's own axes, not row settings
# Config fields that cannot change what a run trains or measures (where it writes, how often it
# logs or checkpoints, caches, timeouts, evaluation batching). Every other field tells runs apart.
# sync_timers: a timing flag that runs of earlier versions saved.
NOT_SETTINGS = ("output_dir", "overwrite", "resume", "data_cache", "data_cache_dir", "dist_timeout_s",
                "save_every", "keep_last", "log_every", "sync_timers", "max_bad_steps", "eval_batch_size")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
FIELD_ORDER = tuple(_DEFAULTS)
METRIC_TEXT = {
    "best_valid": "test accuracy at the evaluation with the best valid accuracy",
    "last": "test accuracy at the last evaluation",
    "best_test": "highest test accuracy of any evaluation (the released code chooses no checkpoint: "
                 "it logs the test accuracy every 250 steps)",
    "rationale_bleu": "test rationales' corpus BLEU against the teacher's, at the evaluation with the best "
                      "valid accuracy",
    "rationale_chrf": "test rationales' chrF against the teacher's, at the evaluation with the best valid accuracy",
}
UNIT_TEXT = {"accuracy": "Test accuracy in %", "rationale": "Score 0-100 (sacrebleu)"}


def _ordered(values, order) -> list:
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in order)


def _read_run(path: Path) -> dict[str, Any] | str:
    """A finished run's results.json (checked against RESULTS) with its config.yaml under
    ``_config``, or why ``path`` is not one."""
    if not path.is_dir():
        return "no such directory"
    if not (path / "results.json").is_file():
        runs = sum((c / "config.yaml").is_file() for c in path.iterdir() if c.is_dir())
        return f"a folder of {runs} runs, not a run: give them as {path}/*" if runs else "no results.json"
    try:
        results = read_json(path / "results.json")
        wrong = problem(results, RESULTS)
        if wrong:
            return f"results.json: {wrong}"
        if not (path / "config.yaml").is_file():
            return "no config.yaml"
        config = read_yaml(path / "config.yaml")
    except UsageError as e:  # the bounded readers' line: names the file (and line)
        return str(e)
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        return "config.yaml is not a mapping of option: value"
    return {**results, "_config": config}


def run_settings(config: dict, results: dict) -> dict[str, Any]:
    """What a run was trained and measured with: every field of its config.yaml but the table's axes
    and NOT_SETTINGS. A field missing from an older run's file is the default it ran with; the label
    type is the one training used (results.json), whether --label_type was given or implied."""
    settings = {k: v for k, v in {**_DEFAULTS, **config}.items() if k not in AXES and k not in NOT_SETTINGS}
    if "label_type" in results:
        settings["label_type"] = results["label_type"]
    return settings


def load_runs(run_dirs: list[str], skipped: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every finished run's results.json with its settings (``_settings``, from config.yaml). A
    directory that is not one is skipped and named through ``skipped`` (one line each, with the
    reason); none left, or no ``skipped`` given, is an error naming them."""
    if not run_dirs:
        raise UsageError("cotmi report needs one or more run directories (each holding a results.json)")
    runs, bad = [], []
    for p in (Path(str(d)).expanduser() for d in run_dirs):
        run = _read_run(p)
        if isinstance(run, str):
            bad.append(f"{p} ({run})")
            continue
        run["_dir"] = str(p)
        run["_settings"] = run_settings(run.pop("_config"), run)
        runs.append(run)
    if bad and (skipped is None or not runs):
        raise UsageError("not finished runs: " + "; ".join(bad))
    for line in bad:
        skipped(f"skipped {line}")
    _name_datasets(runs)
    return runs


def _name_datasets(runs: list[dict[str, Any]]) -> None:
    """A dataset's column is its readable name (your own data's folder or manifest name rather than
    its path), unless two datasets of these runs share the name: those keep their paths."""
    paths_of: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        paths_of[run.get("dataset_name") or run["dataset"]].add(run["dataset"])
    for run in runs:
        name = run.get("dataset_name") or run["dataset"]
        run["dataset"] = name if len(paths_of[name]) == 1 else run["dataset"]


def _cell(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def _same(value: Any) -> str:
    """A hashable stand-in for a setting's value (YAML values: scalars, maybe lists)."""
    return json.dumps(value, sort_keys=True, default=str)


def _setting_names(runs: list[dict[str, Any]]) -> list[str]:
    names = {k for run in runs for k in run["_settings"]}
    return [k for k in FIELD_ORDER if k in names] + sorted(names - set(FIELD_ORDER))


def build_report(runs: list[dict[str, Any]], metric: str) -> tuple[str, str]:
    """(Markdown, CSV) for runs loaded by ``load_runs``."""
    if metric not in METRIC_KEYS:
        raise UsageError(f"--metric {metric!r} is not one of: {', '.join(METRIC_KEYS)}")
    key = METRIC_KEYS[metric]
    scale = 100.0 if key.startswith("accuracy") else 1.0  # accuracies in %, BLEU/chrF already 0-100
    names = _setting_names(runs)
    # Settings that differ between runs of one mode on one dataset split that mode into rows;
    # a setting that differs only between datasets (say, steps) does not.
    varying: dict[tuple, set[str]] = defaultdict(set)  # (model, mode) -> setting names
    values: dict[tuple, set] = defaultdict(set)
    for run in runs:
        for s in names:
            values[(str(run["model"]), run["mode"], run["dataset"], s)].add(_same(run["_settings"].get(s)))
    for (model, mode, _, s), seen in values.items():
        if len(seen) > 1:
            varying[(model, mode)].add(s)
    # model -> (mode, ((setting, value), ...)) -> dataset -> seed -> (figure or None, run)
    table: dict[str, dict[tuple, dict[str, dict[Any, tuple[float | None, dict]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    for run in runs:
        model = str(run["model"])
        row = (run["mode"], tuple((s, run["_settings"].get(s)) for s in names if s in varying[(model, run["mode"])]))
        seeds = table[model][_hashable(row)][run["dataset"]]
        if run["seed"] in seeds:
            raise UsageError(f"{seeds[run['seed']][1]['_dir']} and {run['_dir']} are identical in every setting "
                             f"and seed ({run['seed']}); pass only one of them")
        seeds[run["seed"]] = (select_metrics(run["evaluations"]).get(key), run)
    if all(v is None for rows in table.values() for cells in rows.values() for seeds in cells.values()
           for v, _ in seeds.values()):
        raise UsageError(f"--metric {metric}: none of these runs scored rationales (modes dss and mi do, with "
                         "--eval_rationales > 0)")

    unit = UNIT_TEXT["accuracy" if scale == 100.0 else "rationale"]
    md = [f"# Results: {METRIC_TEXT[metric]} (`--metric {metric}`, results.json `{key}`)", "",
          f"{unit}, mean ± sample standard deviation over seeds (n = number of seeds).", ""]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "mode", *names, "dataset", "metric", "n_seeds", "mean_pct", "std_pct",
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
                    seeds = {seed: (v, run) for seed, (v, run) in rows[row].get(dataset, {}).items() if v is not None}
                    if not seeds:
                        cells.append("–")
                        continue
                    figures = [scale * v for v, _ in seeds.values()]
                    mean, std = _cell(figures)
                    cells.append(f"{mean:.2f} ± {std:.2f} (n={len(figures)})" if std is not None
                                 else f"{mean:.2f} (n=1)")
                    first = next(iter(seeds.values()))[1]["_settings"]  # the cell's runs share every setting
                    writer.writerow([model, mode, *(_csv_value(first.get(k)) for k in names), dataset, metric,
                                     len(figures), f"{mean:.4f}", "" if std is None else f"{std:.4f}",
                                     " ".join(str(s) for s in sorted(seeds, key=str)),
                                     " ".join(r["_dir"] for _, r in seeds.values())])
                md.append(f"| {label} | " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md), out.getvalue()


def _hashable(row: tuple) -> tuple:
    mode, settings = row
    return mode, tuple((k, v if isinstance(v, (str, int, float, bool, type(None))) else _same(v)) for k, v in settings)


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def write_report(run_dirs: list[str], metric: str, output_dir: str | None,
                 skipped: Callable[[str], None] | None = None) -> tuple[str, Path, Path]:
    """Build the tables and write report.md and report.csv into ``output_dir`` (atomically).
    ``skipped``: told of each directory that is not a finished run (else they are an error)."""
    if metric not in METRIC_KEYS:
        raise UsageError(f"--metric {metric!r} is not one of: {', '.join(METRIC_KEYS)}")
    runs = load_runs(run_dirs, skipped)
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
