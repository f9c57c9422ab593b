"""ECE with equal-width and equal-mass bins, on cases computed by hand."""
import random

import pytest

from cotmi_ds.evaluation.calibration import calibration_metrics, ece_equal_mass, ece_equal_width

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
