"""Which of an example's completions gives its rationale, and whether the example trains at all.

The reference answer is the gold label, or where a row has none the majority of the teacher's parsed
answers over its samples (self-consistency). The rationale is that of the first sample whose answer
agrees with the reference, else of the first sample that has one. The policy (``--filter``) then
decides which training rows are kept:

    drop_wrong   a sample's answer agrees with the reference (the default)
    gold_label   any rationale, trained on the gold label (Distilling Step-by-Step's set-up)
    keep_all     every example that got a completion, even one that gave no rationale

Only the training split is filtered: dropping the questions the teacher got wrong from valid or
test would make them easier, so those keep every row.
"""
from __future__ import annotations

from dataclasses import dataclass

from cotmi_ds.data.datasets import Parsed
from cotmi_ds.teacher.answers import Answering

NO_COMPLETION = "no completion (every request for it was rejected)"
NO_RATIONALE = "no rationale in the completion"
NO_ANSWER = "no answer found in the completion"
WRONG = "the teacher's answer disagrees with gold"


@dataclass(frozen=True)
class Outcome:
    rationale: str
    answer: str              # the teacher's answer: the majority over the parsed samples
    parsed: bool             # some sample gave an answer
    correct: bool | None     # the answer agrees with gold (None: no gold)
    agreeing_samples: int    # samples whose answer agrees with the reference
    drop: str | None         # why this example would not train under the policy (None: kept)


def majority(answers: list[str], answering: Answering) -> str:
    """The most frequent answer, equal answers grouped as the scorer groups them (ties: the first)."""
    groups: list[list[str]] = []
    for answer in answers:
        group = next((g for g in groups if answering.agrees(answer, g[0])), None)
        if group is None:
            groups.append([answer])
        else:
            group.append(answer)
    return max(groups, key=len)[0] if groups else ""


def choose(samples: list[Parsed], gold: str | None, answering: Answering, policy: str) -> Outcome:
    """``samples``: the parsed completions in sample order (rejected requests left out)."""
    parsed = [s for s in samples if not s.fallback]
    answer = majority([s.label for s in parsed], answering)
    reference = gold if gold is not None else (answer if parsed else None)
    agreeing = [s for s in parsed if reference is not None and answering.agrees(s.label, reference)]
    with_rationale = [s for s in samples if s.rationale.strip()]
    pick = agreeing[0] if agreeing else (with_rationale[0] if with_rationale else None)
    rationale = pick.rationale if pick is not None else ""
    correct = None if gold is None else bool(parsed) and answering.agrees(answer, gold)
    if not samples:
        drop = NO_COMPLETION
    elif policy == "keep_all":
        drop = None
    elif not rationale.strip():
        drop = NO_RATIONALE
    elif policy == "gold_label":
        drop = None
    elif not parsed:
        drop = NO_ANSWER
    elif not agreeing:
        drop = WRONG  # (without gold the majority always has a sample that agrees)
    else:
        drop = None
    return Outcome(rationale, answer, bool(parsed), correct, len(agreeing), drop)
