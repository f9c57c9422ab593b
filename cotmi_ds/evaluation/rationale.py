"""Rationale quality: the student's rationales scored against the teacher's with sacrebleu.

The student's rationale is its greedy generation from ``"explain: " + x`` (generate.py); the
reference is the teacher's rationale, the dataset's ``rationale`` column (one reference per
example). Both figures are corpus-level, on sacrebleu's default settings, so they equal what
``sacrebleu REF -i HYP -m bleu chrf`` prints for the same texts:

- ``rationale_bleu``: corpus BLEU (4-grams, 13a tokenization, exponential smoothing), 0-100;
- ``rationale_chrf``: corpus chrF (character 6-grams, beta 2, no word n-grams), 0-100.

Training evaluation (every ``--eval_every`` steps) and ``cotmi eval`` both score through here.
"""
from __future__ import annotations

from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF

# The metric names as they appear in the metrics of a split, TensorBoard (eval/<split>/NAME) and
# results.json.
RATIONALE_METRICS = ("rationale_bleu", "rationale_chrf")


def rationale_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """Corpus BLEU and chrF of ``hypotheses[i]`` against ``references[i]``, and how many were
    scored (``rationale_examples``). No rationales: no scores (an empty dict)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} rationales but {len(references)} references")
    if not hypotheses:
        return {}
    hyps, refs = [str(h) for h in hypotheses], [[str(r) for r in references]]
    return {
        "rationale_bleu": float(BLEU().corpus_score(hyps, refs).score),
        "rationale_chrf": float(CHRF().corpus_score(hyps, refs).score),
        "rationale_examples": len(hyps),
    }
