"""Which rationale trains: agreement with gold (or the majority without gold) over samples, and the
three policies."""
from __future__ import annotations

import pytest

from cotmi_ds.data.datasets import Parsed
from cotmi_ds.teacher.answers import for_task
from cotmi_ds.teacher.filters import NO_ANSWER, NO_COMPLETION, NO_RATIONALE, WRONG, choose

NUMERIC = for_task("numeric")


def s(rationale: str, label: str) -> Parsed:
    return Parsed(rationale, label, not label)


def test_the_rationale_of_the_first_sample_that_agrees_with_gold():
    out = choose([s("r1", "5"), s("r2", "4.0"), s("r3", "4")], "( 2 + 2 )", NUMERIC, "drop_wrong")
    assert (out.rationale, out.answer, out.correct, out.agreeing_samples, out.drop) == ("r2", "4.0", True, 2, None)


def test_without_gold_the_majority_answer_decides():
    out = choose([s("r1", "5"), s("r2", "4"), s("r3", "4.0"), s("r4", "")], None, NUMERIC, "drop_wrong")
    assert (out.rationale, out.answer, out.correct, out.drop) == ("r2", "4", None, None)


@pytest.mark.parametrize("samples, policy, drop", [
    ([s("r", "5")], "drop_wrong", WRONG),
    ([s("r", "5")], "gold_label", None),
    ([s("r", "")], "drop_wrong", NO_ANSWER),
    ([s("", "")], "gold_label", NO_RATIONALE),
    ([s("", "")], "keep_all", None),
    ([], "keep_all", NO_COMPLETION),
])
def test_policies(samples, policy, drop):
    assert choose(samples, "4", NUMERIC, policy).drop == drop


def test_a_wrong_majority_with_one_right_sample_keeps_the_right_rationale_but_scores_the_majority():
    out = choose([s("a", "5"), s("b", "5"), s("c", "4")], "4", NUMERIC, "drop_wrong")
    assert (out.rationale, out.answer, out.correct, out.drop) == ("c", "5", False, None)
