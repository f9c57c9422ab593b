"""ECE with equal-width and equal-mass bins, on cases computed by hand."""
import random

import pytest

from cotmi_ds.evaluation.calibration import (calibration_metrics, ece_consecutive_bins, ece_equal_mass,
                                              ece_equal_width, ece_right_closed, first_token_calibration_metrics)

CONF = [0.05, 0.15, 0.12, 0.95, 0.99]
CORRECT = [False, True, False, True, True]


def test_equal_width_by_hand():
    # bins of width 0.1: {0.05}, {0.15, 0.12}, {0.95, 0.99}
    # (1*|0 - 0.05| + 2*|0.5 - 0.135| + 2*|1 - 0.97|) / 5 = (0.05 + 0.73 + 0.06) / 5
    assert ece_equal_width(CONF, CORRECT, 10) == pytest.approx(0.168)


def test_equal_mass_by_hand():
    # sorted: 0.05(x) 0.12(x) 0.15(v) 0.95(v) 0.99(v); 2 bins: i*2//5 -> 0,0,0,1,1
    # (3*|1/3 - 0.32/3| + 2*|1 - 0.97|) / 5 = (0.68 + 0.06) / 5
    assert ece_equal_mass(CONF, CORRECT, 2) == pytest.approx(0.148)
    # 100 bins for 5 predictions: each its own bin, ECE = mean |correct - confidence|
    assert ece_equal_mass(CONF, CORRECT, 100) == pytest.approx((0.05 + 0.12 + 0.85 + 0.05 + 0.01) / 5)


def test_equal_mass_bins_hold_equal_counts():
    # 200 predictions in 100 bins: pairs (0.01k, 0.01k + 0.001), one right and one wrong per pair,
    # so every bin has accuracy 0.5 and confidence 0.01k + 0.0005.
    conf, correct = [], []
    for k in range(100):
        conf += [0.01 * k, 0.01 * k + 0.001]
        correct += [True, False]
    expected = sum(abs(0.5 - (0.01 * k + 0.0005)) for k in range(100)) / 100
    assert ece_equal_mass(conf, correct, 100) == pytest.approx(expected)
    shuffled = list(zip(conf, correct))
    random.Random(0).shuffle(shuffled)
    assert ece_equal_mass(*zip(*shuffled), 100) == pytest.approx(expected)


def test_tied_confidences_share_a_bin_whatever_the_order():
    conf = [0.5, 0.5, 0.5, 0.5, 0.9]
    for correct in ([True, True, False, False, True], [False, False, True, True, True]):
        # the four ties form one bin (accuracy 0.5, confidence 0.5): only the 0.9 one contributes
        assert ece_equal_mass(conf, correct, 5) == pytest.approx(0.1 / 5)


def test_perfect_and_worst_calibration():
    assert ece_equal_width([1.0, 1.0], [True, True]) == 0.0          # 1.0 falls in the last bin
    assert ece_equal_mass([1.0, 1.0], [True, True]) == 0.0
    assert ece_equal_width([0.0, 1.0], [True, False]) == 1.0
    assert ece_equal_mass([0.0, 1.0], [True, False]) == 1.0


def test_calibration_metrics_reports_the_three_figures():
    m = calibration_metrics(CONF, CORRECT)
    assert m["avg_confidence"] == pytest.approx(sum(CONF) / 5)
    assert m["ece_equal_width"] == pytest.approx(0.168)
    assert m["ece_equal_mass"] == pytest.approx(0.216)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError):
        ece_equal_width([0.5], [True, False])


# --- the released code's calibration, as it was meant to work --------------------------------

def test_consecutive_bins_by_hand():
    # sorted: 0.05(x) 0.12(x) 0.15(v) | 0.95(v) 0.99(v) in bins of 3
    # (3*|1/3 - 0.32/3| + 2*|1 - 0.97|) / 5 = (0.68 + 0.06) / 5
    assert ece_consecutive_bins(CONF, CORRECT, 3) == pytest.approx(0.148)
    # bins of 1: mean |correct - confidence|
    assert ece_consecutive_bins(CONF, CORRECT, 1) == pytest.approx((0.05 + 0.85 + 0.12 + 0.05 + 0.01) / 5)


def test_equal_mass_bins_hold_ceil_n_over_100_predictions():
    # N = 250: bins of ceil(2.5) = 3, so 83 bins of 3 and a last one of 1 (84 bins, not 100).
    # Bin k holds confidences 0.1 + 0.002k + (0, 0.0005, 0.001), one right and two wrong: its gap is
    # |1/3 - (0.1005 + 0.002k)|; the last holds 0.95, right: gap 0.05.
    conf, correct = [], []
    for k in range(83):
        conf += [0.1 + 0.002 * k + d for d in (0.0, 0.0005, 0.001)]
        correct += [True, False, False]
    conf.append(0.95)
    correct.append(True)
    expected = (3 * sum(abs(1 / 3 - (0.1005 + 0.002 * k)) for k in range(83)) + 0.05) / 250
    m = first_token_calibration_metrics(conf, correct)
    assert m["first_token_ece_equal_mass"] == pytest.approx(expected)
    shuffled = list(zip(conf, correct))
    random.Random(0).shuffle(shuffled)
    assert first_token_calibration_metrics(*zip(*shuffled))["first_token_ece_equal_mass"] == pytest.approx(expected)
    # 100 bins of 2 or 3 (ours) cut the same predictions elsewhere: a different figure
    assert ece_equal_mass(conf, correct, 100) != pytest.approx(expected)


def test_right_closed_bins_by_hand():
    conf, correct = [0.0, 0.1, 0.2, 0.25, 1.0], [False, True, True, False, True]
    # closed on the right, bin ceil(10 p): [0, 0.1] {0.0 x, 0.1 v}, (0.1, 0.2] {0.2 v}, (0.2, 0.3] {0.25 x},
    # (0.9, 1] {1.0 v}: (2*|0.5 - 0.05| + 0.8 + 0.25 + 0) / 5
    assert ece_right_closed(conf, correct, 10) == pytest.approx(0.39)
    # ours, closed on the left: {0.0 x}, {0.1 v}, {0.2 v, 0.25 x}, {1.0 v}: (0 + 0.9 + 2*|0.5 - 0.225| + 0) / 5
    assert ece_equal_width(conf, correct, 10) == pytest.approx(0.29)


def test_first_token_metrics_report_the_three_figures():
    m = first_token_calibration_metrics(CONF, CORRECT)
    assert set(m) == {"first_token_ece_equal_mass", "first_token_ece_equal_width", "first_token_avg_confidence"}
    assert m["first_token_ece_equal_mass"] == pytest.approx(0.216)   # N = 5: bins of 1
    assert m["first_token_ece_equal_width"] == pytest.approx(0.168)  # no confidence on a bin edge
    assert m["first_token_avg_confidence"] == pytest.approx(sum(CONF) / 5)


def _release_ece_equal_mass(probs, preds, labels):
    """The released calib_metrics.ece_equal_mass, written out: sort (prob, pred, label) tuples, cut
    into consecutive bins of ceil(N/100), correct = pred == label."""
    data = sorted(zip(probs, preds, labels))
    size = -(-len(data) // 100)
    bins = {}
    for i, item in enumerate(data):
        bins.setdefault(i // size, []).append(item)
    return sum(abs(sum(p == y for _, p, y in b) / len(b) - sum(c for c, _, _ in b) / len(b)) * len(b)
               for b in bins.values()) / len(data)


def test_tied_confidences_are_ordered_as_the_release_orders_them():
    """Many ties across bin boundaries: ordered by the predicted first token, then the gold label's
    token ids, the binned ECE is the release's (to float rounding); in the split's order it is not."""
    rng = random.Random(0)
    n = 250  # bins of 3
    probs = [rng.choice([0.5, 0.7, 0.9]) for _ in range(n)]
    preds = [[rng.choice([5, 6, 7])] for _ in range(n)]
    labels = [[rng.choice([5, 6, 7])] + [1] * rng.randint(0, 1) for _ in range(n)]
    correct = [p == y for p, y in zip(preds, labels)]
    release = _release_ece_equal_mass(probs, preds, labels)
    ours = first_token_calibration_metrics(probs, correct, list(zip(preds, labels)))["first_token_ece_equal_mass"]
    assert ours == pytest.approx(release, rel=1e-12)
    assert abs(first_token_calibration_metrics(probs, correct)["first_token_ece_equal_mass"] - release) > 1e-3


def test_tie_keys_decide_which_bin_a_tied_prediction_joins():
    conf, correct = [0.6] * 4, [True, False, True, False]
    assert ece_consecutive_bins(conf, correct, 2) == pytest.approx(0.1)  # split order: half right per bin
    assert ece_consecutive_bins(conf, correct, 2, tie_keys=[3, 1, 2, 0]) == pytest.approx(0.5)  # wrong ones first
