"""Whether a predicted label counts as correct: one scorer per dataset, exact match by default.

Accuracy and calibration use the same scorer, so "correct" means the same thing in both.
"""
from __future__ import annotations

from typing import Callable

from cotmi_ds.evaluation.arith import same_value

Scorer = Callable[[str, str], bool]  # (prediction, gold) -> correct


def exact_match(prediction: str, gold: str) -> bool:
    """The decoded strings are equal after stripping surrounding whitespace (as DSS scores)."""
    return prediction.strip() == gold.strip()


def numeric_match(prediction: str, gold: str) -> bool:
    """SVAMP-style equations: both parse as arithmetic and have the same value; text that does not
    parse (or divides by zero, or overflows) is wrong. Never executes the text."""
    return same_value(prediction, gold)


# Datasets whose labels are equations, scored by value (docs/method.md). Every other dataset
# (esnli, anli1, cqa, ...) is scored by exact match.
SCORERS: dict[str, Scorer] = {
    "synthetic": numeric_match,
    "svamp": numeric_match,
}


def scorer_for(dataset: str) -> Scorer:
    return SCORERS.get(dataset, exact_match)
