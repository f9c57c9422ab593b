"""Calibration of the label predictions: expected calibration error (ECE) and average confidence.

Two confidences, each with its own binning, reported side by side (docs/evaluation.md):
- ours (``calibration_metrics``): the probability the model assigns to its own greedy output, the
  product of the per-token probabilities of the generated label tokens, EOS included
  (``generate.sequence_confidence``); 100 equal-mass bins (ties share a bin) and 10 equal-width bins
  [a, b);
- the released code's, as it was meant to work (``first_token_calibration_metrics``): the top
  softmax probability of the first generated token (``generate.first_token_confidence``);
  consecutive bins of ceil(N/100) predictions sorted by confidence (ties as the release orders
  them), and 10 equal-width bins closed on the right, bin ceil(10 p).
Correct = the dataset's accuracy scorer. For bins b holding n_b of the N predictions, with mean
confidence conf_b and accuracy acc_b:

    ECE = sum_b (n_b / N) * |acc_b - conf_b|
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _ece_from_bins(bins: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> float:
    total = 0.0
    for b in np.unique(bins):
        sel = bins == b
        total += sel.sum() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total / len(confidence))


def _arrays(confidence: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.shape != corr.shape or conf.ndim != 1:
        raise ValueError(f"confidence and correct must be equal-length sequences, got {conf.shape}, {corr.shape}")
    return conf, corr


def ece_equal_width(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """Bins [0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1] of the confidence axis; empty bins are skipped."""
    conf, corr = _arrays(confidence, correct)
    if len(conf) == 0:
        return float("nan")
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    return _ece_from_bins(bins, conf, corr)


def ece_equal_mass(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 100) -> float:
    """Predictions sorted by confidence and cut into ``n_bins`` groups of (nearly) equal size: the
    i-th smallest of N goes to bin floor(i * n_bins / N), so sizes differ by at most one and with
    N <= n_bins every prediction is its own bin. Predictions with identical confidence always share
    a bin (the bin of the first of them), so the value does not depend on the order of the examples."""
    conf, corr = _arrays(confidence, correct)
    n = len(conf)
    if n == 0:
        return float("nan")
    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]
    bins_sorted = (np.arange(n) * n_bins) // n
    # A tie takes the bin of its first (smallest-index) member in sorted order.
    first_of_value = np.searchsorted(sorted_conf, sorted_conf, side="left")
    bins_sorted = bins_sorted[first_of_value]
    bins = np.empty(n, dtype=np.int64)
    bins[order] = bins_sorted
    return _ece_from_bins(bins, conf, corr)


def calibration_metrics(confidence: Sequence[float], correct: Sequence[bool]) -> dict[str, float]:
    """The three figures the evaluation reports (100 equal-mass bins, 10 equal-width bins)."""
    conf, corr = _arrays(confidence, correct)
    return {
        "ece_equal_mass": ece_equal_mass(conf, corr, 100),
        "ece_equal_width": ece_equal_width(conf, corr, 10),
        "avg_confidence": float(conf.mean()) if len(conf) else float("nan"),
    }


def ece_consecutive_bins(confidence: Sequence[float], correct: Sequence[bool], bin_size: int,
                         tie_keys: Sequence[Any] | None = None) -> float:
    """Predictions sorted by confidence, equal confidences by ``tie_keys`` (then by their order in
    the split), and cut into consecutive bins of ``bin_size``; the last bin holds what is left."""
    conf, corr = _arrays(confidence, correct)
    if len(conf) == 0:
        return float("nan")
    if tie_keys is None:
        order = np.argsort(conf, kind="stable")
    else:
        order = np.array(sorted(range(len(conf)), key=lambda i: (conf[i], tie_keys[i])), dtype=np.int64)
    bins = np.empty(len(conf), dtype=np.int64)
    bins[order] = np.arange(len(conf)) // bin_size
    return _ece_from_bins(bins, conf, corr)


def ece_right_closed(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """Bins [0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]: confidence p goes to bin ceil(n p) (p = 0 joins
    the first bin)."""
    conf, corr = _arrays(confidence, correct)
    if len(conf) == 0:
        return float("nan")
    bins = np.maximum(np.ceil(conf * n_bins).astype(np.int64), 1)
    return _ece_from_bins(bins, conf, corr)


def first_token_calibration_metrics(confidence: Sequence[float], correct: Sequence[bool],
                                    tie_keys: Sequence[Any] | None = None) -> dict[str, float]:
    """The released code's calibration, as it was meant to work, on first-token confidences: ECE over
    bins of ceil(N/100) predictions (N = 1,221 gives 93 bins of 13 and one of 12), ECE over 10
    right-closed bins, and the average confidence. The release sorts (confidence, prediction, label)
    tuples, so equal confidences are ordered by the predicted first token's id, then by the gold
    label's token ids: ``tie_keys`` ([first token id], gold ids) orders them the same way."""
    conf, corr = _arrays(confidence, correct)
    n = len(conf)
    return {
        "first_token_ece_equal_mass": ece_consecutive_bins(conf, corr, max(1, -(-n // 100)), tie_keys),
        "first_token_ece_equal_width": ece_right_closed(conf, corr, 10),
        "first_token_avg_confidence": float(conf.mean()) if n else float("nan"),
    }
