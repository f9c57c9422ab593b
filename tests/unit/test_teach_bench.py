"""`cotmi bench teach`'s flags and summary (the bench itself runs a server: docs/teacher.md has its figures)."""
from __future__ import annotations

import pytest

from benchmarks.teach_bench import run, summary
from cotmi_ds.errors import UsageError


def test_summary_reports_medians_and_same_round_ratios():
    results = {"ceiling": [{"wall_s": 10.0, "cpu_s": 0.1}, {"wall_s": 8.0, "cpu_s": 0.1}],
               "tool": [{"wall_s": 10.0, "cpu_s": 1.0}, {"wall_s": 10.0, "cpu_s": 3.0}]}
    text = summary(results, 100)
    assert "cotmi teach / ceiling: 0.889x (per round: 1.000, 0.800)" in text  # medians: 10.0 / 11.25
    assert text.splitlines()[1].split() == ["ceiling", "11.2", "1.00"]
    assert text.splitlines()[2].split() == ["cotmi", "teach", "10.0", "20.00"]


def test_unknown_flag():
    with pytest.raises(UsageError, match=r"unknown flag --request for `cotmi bench teach` \(did you mean 'requests'\?\)"):
        run(request=5)
