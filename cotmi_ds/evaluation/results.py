"""What a run's results.json holds, and the three accuracies it reports.

Nothing in the released code chooses a checkpoint: it logs the test accuracy every 250 steps, and
which of those figures a published number is, it does not record. A run therefore reports three,
each with its step:
- ``accuracy_last``: test accuracy at the last evaluation;
- ``accuracy_best_test``: the highest test accuracy of any evaluation (the best of the logged figures);
- ``accuracy_at_best_valid``: test accuracy at the evaluation with the best valid accuracy (the one
  a practitioner could choose without looking at the test set).
Ties go to the earliest evaluation. Runs that score rationales (dss, mi) also report the test
split's rationale BLEU and chrF at the last evaluation and at the best-valid one.
"""
from __future__ import annotations

from typing import Any

from cotmi_ds.evaluation.rationale import RATIONALE_METRICS
from cotmi_ds.schema import Check, Optional, at_least

# `cotmi report --metric NAME` -> the results.json key
METRIC_KEYS = {"best_valid": "accuracy_at_best_valid", "last": "accuracy_last", "best_test": "accuracy_best_test",
               **{name: f"{name}_at_best_valid" for name in RATIONALE_METRICS}}


# One evaluation as results.json and a checkpoint's metadata record it: what the selections below read.
ACCURACY = Check(float, lambda v: 0.0 <= v <= 1.0, "an accuracy in [0, 1]")
SPLIT_METRICS = {"accuracy": ACCURACY, **{name: Optional(float) for name in RATIONALE_METRICS}}
EVALUATION = {"step": at_least(0), "valid": SPLIT_METRICS, "test": SPLIT_METRICS}
# What `cotmi report` reads from a results.json.
RESULTS = {"dataset": str, "dataset_name": Optional(str), "model": str, "mode": str, "seed": int,
           "label_type": Optional(str),
           "evaluations": Check([EVALUATION], bool, "at least one evaluation")}


def run_metadata(cfg) -> dict[str, Any]:
    """What identifies a run in a results table (its dataset also by a readable name, the column
    `cotmi report` shows, and its task kind); label_type is the one training used (what the mode
    implies when --label_type is unset)."""
    from cotmi_ds.data import task_kind
    from cotmi_ds.data.own import dataset_name
    from cotmi_ds.modes import label_type_of

    return {
        "dataset": cfg.dataset, "dataset_name": dataset_name(cfg.dataset), "task": task_kind(cfg.dataset, cfg.task),
        "model": cfg.model, "mode": cfg.mode, "alpha": cfg.alpha, "beta": cfg.beta,
        "label_type": label_type_of(cfg), "subsample": cfg.subsample,
        "seed": cfg.seed,
    }


def select_accuracies(history: list[dict]) -> dict[str, Any]:
    """The three accuracies (and their steps) from a list of evaluations
    ``[{"step": s, "valid": {"accuracy": ...}, "test": {"accuracy": ...}}, ...]``."""
    if not history:
        raise ValueError("no evaluations to select from")
    last = history[-1]
    best_test = max(history, key=lambda e: e["test"]["accuracy"])     # max keeps the first of ties
    best_valid = max(history, key=lambda e: e["valid"]["accuracy"])
    return {
        "accuracy_last": last["test"]["accuracy"], "step_last": last["step"],
        "accuracy_best_test": best_test["test"]["accuracy"], "step_best_test": best_test["step"],
        "accuracy_at_best_valid": best_valid["test"]["accuracy"], "step_at_best_valid": best_valid["step"],
        "valid_accuracy_at_best_valid": best_valid["valid"]["accuracy"],
    }


def select_rationale_scores(history: list[dict]) -> dict[str, Any]:
    """The test split's rationale scores at the last evaluation (``rationale_bleu_last``, ...) and at
    the one with the best valid accuracy (``rationale_bleu_at_best_valid``, ...); only the scores
    that evaluation holds (none in modes without a rationale pass)."""
    if not history:
        raise ValueError("no evaluations to select from")
    best_valid = max(history, key=lambda e: e["valid"]["accuracy"])
    out = {}
    for where, evaluation in (("last", history[-1]), ("at_best_valid", best_valid)):
        for name in RATIONALE_METRICS:
            if name in evaluation["test"]:
                out[f"{name}_{where}"] = evaluation["test"][name]
    return out


def select_metrics(history: list[dict]) -> dict[str, Any]:
    """``select_accuracies`` and ``select_rationale_scores`` together: what results.json reports."""
    return {**select_accuracies(history), **select_rationale_scores(history)}
