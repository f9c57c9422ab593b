"""The teacher's answer in a completion, and whether it agrees with gold.

The four benchmarks' completions are read by their own parsers in data/datasets.py (DSS's, applied to
PaLM's outputs by `cotmi data stats`), and compared as `cotmi data stats` compares them, so a teacher's
accuracy here is the figure the trainer's data summary shows. Your own data is read by task kind, from
the sentence the shipped templates ask for: "So the answer is <answer>."

    choice   "(b)", "(b) text" or the text of a choice -> that choice's text; anything else: unparsed
    exact    the text after "answer is", one trailing "." removed
    numeric  the number or arithmetic expression after "answer is" (units and "$" left out), compared by value
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from cotmi_ds.data import task_kind
from cotmi_ds.data.arith import evaluate_arithmetic
from cotmi_ds.data.datasets import DSS_DATASETS, Parsed, labels_agree
from cotmi_ds.evaluation.scoring import scorer_for
_ANSWER = re.compile(r"(?:so |therefore,? |thus,? )?the (?:final )?answer is:?\s*", re.I)
_MARKER = re.compile(r"\(?([a-z])\)\s*", re.I)
_EXPRESSION = re.compile(r"[-+*/().\d\s]+")


@dataclass(frozen=True)
class Answering:
    """How one dataset's completions are read and checked."""
    task: str                                  # choice | exact | numeric: the kind `cotmi train` scores by
    parse: Callable[[str, dict], Parsed]       # (completion, row) -> rationale, label, fallback
    agrees: Callable[[str, str], bool]         # (the teacher's answer, gold) -> right


def for_benchmark(name: str) -> Answering:
    """DSS's parser, and agreement as `cotmi data stats` counts it."""
    bench, kind = DSS_DATASETS[name], task_kind(name)
    return Answering(kind, lambda text, row: bench.parse(text), lambda a, b: labels_agree(a, b, kind))


def for_task(task: str) -> Answering:
    """The kind's parser, and agreement as the student is scored (evaluation/scoring.py)."""
    parse = {"choice": parse_choice, "exact": parse_exact, "numeric": parse_numeric}[task]
    return Answering(task, parse, scorer_for(task))


def split_answer(text: str) -> tuple[str, str] | None:
    """(rationale, answer text) around the first "... the answer is", the answer up to the end of its
    line with one trailing "." removed; None when the completion never says it."""
    match = _ANSWER.search(text)
    if match is None:
        return None
    answer = text[match.end():].split("\n", 1)[0].strip()
    answer = answer[:-1].rstrip() if answer.endswith(".") else answer
    return text[:match.start()].strip(), answer


def parse_exact(text: str, row: dict) -> Parsed:
    found = split_answer(text)
    if found is None or not found[1]:
        return Parsed(found[0] if found else text.strip(), "", True)
    return Parsed(found[0], found[1], False)


def parse_choice(text: str, row: dict) -> Parsed:
    """The chosen choice's text, by its letter or its text (case and surrounding spaces ignored)."""
    found = split_answer(text)
    choices = [str(c) for c in row.get("choices") or []]
    if found is None:
        return Parsed(text.strip(), "", True)
    rationale, answer = found
    marker = _MARKER.match(answer)
    if marker and choices:
        index = ord(marker.group(1).lower()) - ord("a")
        if 0 <= index < len(choices):
            return Parsed(rationale, choices[index], False)
    rest = answer[marker.end():] if marker else answer
    for choice in choices:
        if rest.strip().lower() == choice.strip().lower():
            return Parsed(rationale, choice, False)
    return Parsed(rationale, "", True) if choices else Parsed(rationale, rest.strip(), not rest.strip())


def parse_numeric(text: str, row: dict) -> Parsed:
    """The leading number or expression of the answer ("$1,200 dollars" -> "1200"); unparsed when it
    is not arithmetic (checked with the safe parser, never executed)."""
    found = split_answer(text)
    if found is None:
        return Parsed(text.strip(), "", True)
    rationale, answer = found
    match = _EXPRESSION.match(re.sub(r"(?<=\d),(?=\d{3})", "", answer.lstrip("$ ")))
    expression = match.group(0).strip() if match else ""
    if not expression or evaluate_arithmetic(expression) is None:
        return Parsed(rationale, "", True)
    return Parsed(rationale, expression, False)
