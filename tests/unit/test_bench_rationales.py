"""`cotmi bench rationales`: flags, and the table it builds from finished run directories (no training)."""
import json

import pytest

from benchmarks import rationale_grid
from cotmi_ds.errors import UsageError


def _finished(out, name, acc, bleu, chrf, rationales):
    run = out / name
    (run / "predictions").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "accuracy_at_best_valid": acc, "step_at_best_valid": 250,
        "rationale_bleu_at_best_valid": bleu, "rationale_chrf_at_best_valid": chrf}))
    rows = [{"index": i, "rationale": r} for i, r in enumerate(rationales + [None])]
    (run / "predictions" / "step000250-test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_finished_runs_are_reused_and_tabulated(tmp_path, monkeypatch):
    _finished(tmp_path, "dss-seed0", 0.9, 80.0, 88.0, ["First 2 + 3 = 5.", "We add: 2 + 3 = 5."])
    _finished(tmp_path, "dss-seed1", 0.8, 82.0, 90.0, ["First 2 + 3 = 5.", "x"])
    _finished(tmp_path, "mi-paper-seed0", 0.9, 30.0, 40.0, ["( 2 + 3 ) First", " (2"])
    _finished(tmp_path, "mi-paper-seed1", 0.9, 25.0, 35.0, ["First ( 2", "x"])
    monkeypatch.setattr(rationale_grid.subprocess, "run", lambda *a, **k: pytest.fail("trained again"))
    md = rationale_grid.run(out=str(tmp_path), seeds=(0, 1), methods="dss,mi-paper", steps=250)
    assert "| dss | 85.0 ± 7.1 (n=2) | 80.0–82.0 | 88.0–90.0 | 0/2, 0/2 | 0/2, 0/2 |" in md
    assert "| mi-paper | 90.0 ± 0.0 (n=2) | 25.0–30.0 | 35.0–40.0 | 2/2, 0/2 | 2/2, 1/2 |" in md
    assert (tmp_path / "table.md").read_text() == md


@pytest.mark.parametrize("flags, message", [
    ({"methods": "dss,mi"}, "--methods 'mi' is not one of: dss, mi-paper, mi-masked"),
    ({"step": 5}, "unknown flag --step"),
    ({"seeds": "a"}, "--seeds 'a': expected comma-separated whole numbers"),
    ({"steps": 0}, "--steps must be > 0, got 0"),
])
def test_bad_flags_are_usage_errors(flags, message):
    with pytest.raises(UsageError, match=message):
        rationale_grid.run(**flags)
