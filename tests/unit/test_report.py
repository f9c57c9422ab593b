"""`cotmi report` on run directories written by the test (results.json only, no training)."""
import csv
import io
import json
import statistics

import pytest

from cotmi_ds.config import UsageError
from cotmi_ds.evaluation.report import build_report, load_runs, write_report
from tests.conftest import run_cotmi


def _run(root, name, *, model="t5-small", mode="mi", dataset="svamp", seed=0, accs=((0.5, 0.4), (0.7, 0.6)),
         **extra):
    """A run directory whose evaluations have the given (valid, test) accuracies at steps 250, 500, ..."""
    d = root / name
    d.mkdir()
    evaluations = [{"step": 250 * (i + 1), "valid": {"accuracy": v, "correct": 0, "total": 1},
                    "test": {"accuracy": t, "correct": 0, "total": 1}} for i, (v, t) in enumerate(accs)]
    results = {"dataset": dataset, "model": model, "mode": mode, "alpha": 0.5, "beta": 0.1, "label_type": "gt",
               "subsample": 1.0, "seed": seed, "steps": 250 * len(accs), "evaluations": evaluations, **extra}
    (d / "results.json").write_text(json.dumps(results))
    return str(d)


@pytest.fixture
def runs(tmp_path):
    dirs = []
    # model t5-small, svamp: dss seeds 0,1,2 and mi seeds 0,1; mi also on cqa (one seed)
    # evaluations (valid, test): best valid is the first, best test the second, last the third
    for seed, base in enumerate([0.40, 0.44, 0.48]):
        dirs.append(_run(tmp_path, f"dss-{seed}", mode="dss", seed=seed,
                         accs=((0.9, base), (0.5, base + 0.2), (0.6, base + 0.1))))
    for seed, base in enumerate([0.50, 0.54]):
        dirs.append(_run(tmp_path, f"mi-{seed}", mode="mi", seed=seed,
                         accs=((0.9, base), (0.5, base + 0.2), (0.6, base + 0.1))))
    dirs.append(_run(tmp_path, "mi-cqa", mode="mi", dataset="cqa", accs=((0.5, 0.61),)))
    dirs.append(_run(tmp_path, "base-mi", model="t5-base", mode="mi", accs=((0.5, 0.7),)))
    return dirs


def _rows(table_csv):
    return list(csv.DictReader(io.StringIO(table_csv)))


@pytest.mark.parametrize("metric, offset", [("best_valid", 0.0), ("best_test", 0.2), ("last", 0.1)])
def test_mean_and_std_over_seeds_for_each_metric(runs, metric, offset):
    markdown, table_csv = build_report(load_runs(runs), metric)
    rows = {(r["model"], r["mode"], r["dataset"]): r for r in _rows(table_csv)}
    dss = rows[("t5-small", "dss", "svamp")]
    expected = [100 * (b + offset) for b in (0.40, 0.44, 0.48)]
    assert int(dss["n_seeds"]) == 3 and dss["seeds"] == "0 1 2"
    assert float(dss["mean_pct"]) == pytest.approx(statistics.mean(expected))
    assert float(dss["std_pct"]) == pytest.approx(statistics.stdev(expected))           # 4.00
    mi = rows[("t5-small", "mi", "svamp")]
    assert float(mi["mean_pct"]) == pytest.approx(100 * (0.52 + offset))
    assert rows[("t5-small", "mi", "cqa")]["std_pct"] == ""                           # one seed
    assert len(rows) == 4
    # Markdown: one table per model, modes as rows in the paper's order, datasets as columns
    assert markdown.index("## t5-base") < markdown.index("## t5-small")
    small = markdown[markdown.index("## t5-small"):]
    assert "| mode | cqa | svamp |" in small
    assert small.index("| dss |") < small.index("| mi |")
    assert f"| dss | – | {statistics.mean(expected):.2f} ± 4.00 (n=3) |" in small
    assert f"--metric {metric}" in markdown


def test_runs_of_one_mode_with_different_settings_get_separate_rows(tmp_path):
    dirs = [_run(tmp_path, "a", beta=0.1), _run(tmp_path, "b", beta=0.2),
            _run(tmp_path, "c", dataset="cqa", steps=100)]  # steps differ only between datasets: no split
    markdown, table_csv = build_report(load_runs(dirs), "best_valid")
    assert "| mi (beta=0.1) | 60.00 (n=1) | 60.00 (n=1) |" in markdown
    assert "| mi (beta=0.2) | – | 60.00 (n=1) |" in markdown
    assert {(r["dataset"], r["beta"], r["steps"]) for r in _rows(table_csv)} == {
        ("cqa", "0.1", "100"), ("svamp", "0.1", "500"), ("svamp", "0.2", "500")}


def test_the_same_configuration_and_seed_twice_is_an_error(tmp_path):
    dirs = [_run(tmp_path, "a"), _run(tmp_path, "b")]
    with pytest.raises(UsageError, match=r"a and .*b are the same configuration and seed \(0\)"):
        build_report(load_runs(dirs), "best_valid")


def test_directories_that_are_not_runs_are_named(tmp_path, runs):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"dataset": "svamp"}))
    bad = [str(tmp_path / n) for n in ("empty", "broken", "old", "missing")]
    with pytest.raises(UsageError) as e:
        load_runs(runs[:1] + bad)
    msg = str(e.value)
    assert "\n" not in msg and runs[0] not in msg
    for path, why in zip(bad, ("no results.json", "results.json is not valid JSON",
                               "results.json has no 'model'", "no such directory")):
        assert f"{path} ({why})" in msg


def test_cli_prints_and_writes_markdown_and_csv(runs, tmp_path):
    out = tmp_path / "report"
    proc = run_cotmi(["report", *runs, "--metric", "last", "--output_dir", str(out)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").read_text() in proc.stdout
    assert "| mi |" in proc.stdout and "n=2" in proc.stdout
    assert len(_rows((out / "report.csv").read_text())) == 4
    proc = run_cotmi(["report", runs[0], str(tmp_path / "nope")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"cotmi: error: not finished runs: {tmp_path / 'nope'} (no such directory)"
    proc = run_cotmi(["report", runs[0], "--metric", "best"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "--metric 'best' is not one of: best_valid, last, best_test" in proc.stderr


def test_write_report_writes_both_files(runs, tmp_path):
    markdown, md, table = write_report(runs, "best_valid", str(tmp_path / "r"))
    assert md.read_text() == markdown and table.read_text().startswith("model,mode,")
