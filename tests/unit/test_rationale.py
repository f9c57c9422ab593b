"""Rationale quality: corpus BLEU and chrF as sacrebleu's own command line prints them."""
import math

import pytest

from cotmi_ds.evaluation.rationale import rationale_scores


def test_bleu_by_hand_and_chrf_as_the_cli_prints():
    # Every n-gram of "a b c d" is in "a b c d e": precisions 1, so BLEU = the brevity penalty
    # exp(1 - 5/4). `sacrebleu r.txt -i h.txt -m bleu chrf -w 6 -b` prints 77.880078 and 72.573464.
    s = rationale_scores(["a b c d"], ["a b c d e"])
    assert s["rationale_bleu"] == pytest.approx(100 * math.exp(-0.25))
    assert s["rationale_bleu"] == pytest.approx(77.880078, abs=1e-6)
    assert s["rationale_chrf"] == pytest.approx(72.573464, abs=1e-6)
    assert s["rationale_examples"] == 1


def test_a_corpus_scores_as_a_whole_as_the_cli_prints():
    # `sacrebleu ref.txt -i hyp.txt -m bleu chrf -w 4 -b` on these three lines: 38.3189, 46.2977
    # (BLEU 82.8/69.2/56.5/40.0, BP 0.639, hyp_len 29, ref_len 42: pooled over the corpus, not averaged).
    hyps = ["First 12 + 7 = 19.", "We take 5 away from 9, so we subtract: 9 - 5 = 4.", "( 3 * 4 )"]
    refs = ["First 12 + 7 = 19.", "We take 5 away from 10, so we subtract: 10 - 5 = 5.",
            "There are 3 groups of 4 pens, so we multiply: 3 * 4 = 12."]
    s = rationale_scores(hyps, refs)
    assert round(s["rationale_bleu"], 4) == 38.3189
    assert round(s["rationale_chrf"], 4) == 46.2977
    assert s["rationale_examples"] == 3
    per_line = [rationale_scores([h], [r])["rationale_bleu"] for h, r in zip(hyps, refs)]
    assert s["rationale_bleu"] != pytest.approx(sum(per_line) / 3)


def test_identical_perfect_disjoint_zero_and_none_is_nothing():
    assert rationale_scores(["the cat sat on the mat"], ["the cat sat on the mat"]) == {
        "rationale_bleu": pytest.approx(100.0), "rationale_chrf": pytest.approx(100.0), "rationale_examples": 1}
    s = rationale_scores(["xyz"], ["the cat sat on the mat"])
    assert s["rationale_bleu"] == 0.0 and s["rationale_chrf"] == 0.0
    assert rationale_scores([], []) == {}
    with pytest.raises(ValueError, match="2 rationales but 1 references"):
        rationale_scores(["a", "b"], ["a"])
