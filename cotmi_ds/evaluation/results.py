"""What a run's results.json holds, and the three accuracies it reports.

Nothing in the released code chooses a checkpoint: it logs the test accuracy every 250 steps, and
which of those figures a published number is, it does not record. A run therefore reports three,
each with its step:
- ``accuracy_last``: test accuracy at the last evaluation;
- ``accuracy_best_test``: the highest test accuracy of any evaluation (the best of the logged figures);
- ``accuracy_at_best_valid``: test accuracy at the evaluation with the best valid accuracy (the one
  a practitioner could choose without looking at the test set).
Ties go to the earliest evaluation.
"""
from __future__ import annotations

from typing import Any

# `cotmi report --metric NAME` -> the results.json key
METRIC_KEYS = {"best_valid": "accuracy_at_best_valid", "last": "accuracy_last", "best_test": "accuracy_best_test"}


def run_metadata(cfg) -> dict[str, Any]:
    """What identifies a run in a results table; label_type is the one training used (what the mode
    implies when --label_type is unset)."""
    from cotmi_ds.data.splits import label_type_of

    return {
        "dataset": cfg.dataset, "model": cfg.model, "mode": cfg.mode, "alpha": cfg.alpha, "beta": cfg.beta,
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
