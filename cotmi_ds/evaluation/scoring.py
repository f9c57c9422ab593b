"""Whether a predicted label counts as correct: one scorer per task kind (data/__init__.py).

Accuracy and calibration use the same scorer, so "correct" means the same thing in both.
"""
from __future__ import annotations

from typing import Callable

from cotmi_ds.data.arith import same_value

Scorer = Callable[[str, str], bool]  # (prediction, gold) -> correct


def exact_match(prediction: str, gold: str) -> bool:
    """The decoded strings are equal after stripping surrounding whitespace (as DSS scores)."""
    return prediction.strip() == gold.strip()


def numeric_match(prediction: str, gold: str) -> bool:
    """SVAMP-style equations: both parse as arithmetic and have the same value; text that does not
    parse (or divides by zero, or overflows) is wrong. Never executes the text."""
    return same_value(prediction, gold)


# Task kind -> scorer. Equations are scored by value (docs/method.md); a choice by the text of the
# answer, as exact match.
SCORERS: dict[str, Scorer] = {
    "numeric": numeric_match,
    "choice": exact_match,
    "exact": exact_match,
}


def scorer_for(kind: str) -> Scorer:
    """The scorer of a task kind (``data.task_kind(dataset)``)."""
    return SCORERS[kind]
