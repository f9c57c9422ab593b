"""`cotmi report` on run directories written by the test (results.json only, no training)."""
import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from cotmi_ds.config import TrainConfig
from cotmi_ds.errors import UsageError
from cotmi_ds.evaluation.report import build_report, load_runs, write_report
from tests.conftest import run_cotmi


def _run(root, name, *, model="t5-small", mode="mi", dataset="svamp", seed=0, accs=((0.5, 0.4), (0.7, 0.6)),
         chrf=None, **settings):
    """A run directory as `cotmi train` leaves it: config.yaml (the defaults, these arguments and
    ``settings``) and results.json, whose evaluations have the given (valid, test) accuracies (and
    test rationale chrF/BLEU ``chrf[i]``/``chrf[i] / 2``) at steps 250, 500, ..."""
    d = root / name
    d.mkdir()
    evaluations = [{"step": 250 * (i + 1), "valid": {"accuracy": v, "correct": 0, "total": 1},
                    "test": {"accuracy": t, "correct": 0, "total": 1}} for i, (v, t) in enumerate(accs)]
    for e, c in zip(evaluations, chrf or ()):
        e["test"].update(rationale_chrf=c, rationale_bleu=c / 2)
    config = TrainConfig(model=model, mode=mode, dataset=dataset, seed=seed, max_steps=250 * len(accs),
                         **{"output_dir": str(d), **settings}).to_dict()
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"dataset": dataset, "model": model, "mode": mode, "alpha": config["alpha"], "beta": config["beta"],
               "label_type": config["label_type"] or "gt", "subsample": config["subsample"], "seed": seed,
               "steps": config["max_steps"], "evaluations": evaluations}
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
            _run(tmp_path, "c", dataset="cqa", accs=((0.5, 0.4),))]  # steps differ only between datasets: no split
    markdown, table_csv = build_report(load_runs(dirs), "best_valid")
    assert "| mi (beta=0.1) | 40.00 (n=1) | 60.00 (n=1) |" in markdown
    assert "| mi (beta=0.2) | – | 60.00 (n=1) |" in markdown
    assert {(r["dataset"], r["beta"], r["max_steps"]) for r in _rows(table_csv)} == {
        ("cqa", "0.1", "250"), ("svamp", "0.1", "500"), ("svamp", "0.2", "500")}


@pytest.mark.parametrize("setting, values, labels", [
    ("mi_variant", ("paper", "masked"), ("mi_variant=masked", "mi_variant=paper")),
    ("lr", (0.003, 0.0001), ("lr=0.0001", "lr=0.003")),
    ("batch_size", (32, 8), ("batch_size=32", "batch_size=8")),
])
def test_any_setting_that_differs_splits_the_rows(tmp_path, setting, values, labels):
    """Settings read from config.yaml, not a fixed list; two seeds each, so the cells hold a mean."""
    dirs = [_run(tmp_path, f"{v}-{seed}", seed=seed, accs=((0.5, 0.1 * (i + 1) + 0.01 * seed),), **{setting: v})
            for i, v in enumerate(values) for seed in (0, 1)]
    markdown, table_csv = build_report(load_runs(dirs), "best_valid")
    for label in labels:
        assert f"| mi ({label}) |" in markdown
    assert markdown.count("| mi") == 2 and "(n=2)" in markdown
    rows = {r[setting]: r for r in _rows(table_csv)}
    assert set(rows) == {str(v) for v in values}
    assert float(rows[str(values[0])]["mean_pct"]) == pytest.approx(10.5)
    assert float(rows[str(values[1])]["mean_pct"]) == pytest.approx(20.5)
    # The CSV holds every setting (not only those that differ), bookkeeping fields aside.
    header = next(csv.reader(io.StringIO(table_csv)))
    assert {"lr", "mi_variant", "batch_size", "alpha", "warmup_steps", "max_target_length"} <= set(header)
    assert "output_dir" not in header and "log_every" not in header


def test_two_settings_at_once_label_the_row_with_both(tmp_path):
    dirs = [_run(tmp_path, "a", mi_variant="paper", lr=0.003), _run(tmp_path, "b", mi_variant="masked", lr=0.001),
            _run(tmp_path, "c", mi_variant="masked", lr=0.003), _run(tmp_path, "d", mode="dss", lr=0.001)]
    markdown, table_csv = build_report(load_runs(dirs), "best_valid")
    # settings in the config's field order; dss alone has no difference within its mode
    for label in ("mi (mi_variant=paper, lr=0.003)", "mi (mi_variant=masked, lr=0.001)",
                  "mi (mi_variant=masked, lr=0.003)"):
        assert f"| {label} | 60.00 (n=1) |" in markdown
    assert "| dss | 60.00 (n=1) |" in markdown
    assert len(_rows(table_csv)) == 4


def test_only_runs_identical_in_every_setting_and_seed_are_refused(tmp_path):
    dirs = [_run(tmp_path, "a"), _run(tmp_path, "b", log_every=5, save_every=0, output_dir="elsewhere")]
    with pytest.raises(UsageError, match=r"a and .*b are identical in every setting and seed \(0\)"):
        build_report(load_runs(dirs), "best_valid")
    # a setting missing from an older run's config.yaml is the default it ran with
    config = tmp_path / "b" / "config.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(config.read_text()).items()
                                      if k != "mi_variant"}))
    with pytest.raises(UsageError, match="identical in every setting"):
        build_report(load_runs(dirs), "best_valid")
    # mode distill implies llm labels: --label_type llm given or implied is the same training
    dirs = [_run(tmp_path, "c", mode="distill"), _run(tmp_path, "d", mode="distill", label_type="llm")]
    (tmp_path / "c" / "results.json").write_text(
        (tmp_path / "c" / "results.json").read_text().replace('"label_type": "gt"', '"label_type": "llm"'))
    (tmp_path / "d" / "results.json").write_text(
        (tmp_path / "d" / "results.json").read_text().replace('"label_type": "gt"', '"label_type": "llm"'))
    with pytest.raises(UsageError, match="identical in every setting"):
        build_report(load_runs(dirs), "best_valid")


def test_rationale_metrics_are_a_table_of_their_own(tmp_path):
    dirs = [_run(tmp_path, "dss", mode="dss", chrf=(80.0, 70.0)),
            _run(tmp_path, "paper", chrf=(40.0, 30.0)),
            _run(tmp_path, "masked", mi_variant="masked", chrf=(60.0, 65.0)),
            _run(tmp_path, "std", mode="standard")]  # no rationale pass: an empty cell, not a crash
    markdown, table_csv = build_report(load_runs(dirs), "rationale_chrf")
    # at the best-valid evaluation (the second: valid 0.7)
    assert "| dss | 70.00 (n=1) |" in markdown
    assert "| mi (mi_variant=paper) | 30.00 (n=1) |" in markdown
    assert "| mi (mi_variant=masked) | 65.00 (n=1) |" in markdown
    assert "| standard | – |" in markdown
    assert "rationale_chrf_at_best_valid" in markdown and "Test accuracy" not in markdown
    assert {r["mode"] for r in _rows(table_csv)} == {"dss", "mi"}
    markdown, _ = build_report(load_runs(dirs), "rationale_bleu")
    assert "| dss | 35.00 (n=1) |" in markdown
    with pytest.raises(UsageError, match="--metric rationale_chrf: none of these runs scored rationales"):
        build_report(load_runs(dirs[3:]), "rationale_chrf")


def test_directories_that_are_not_runs_are_named(tmp_path, runs):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"dataset": "svamp"}))
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "results.json").write_text(Path(runs[0], "results.json").read_text())
    bad = [str(tmp_path / n) for n in ("empty", "broken", "old", "missing", "noconfig")]
    whys = ("no results.json", f"{tmp_path / 'broken' / 'results.json'}:1: not valid JSON",
            "results.json: model: missing", "no such directory", "no config.yaml")
    with pytest.raises(UsageError) as e:  # without a way to say what it skipped: an error naming each
        load_runs(runs[:1] + bad)
    msg = str(e.value)
    assert "\n" not in msg and runs[0] not in msg
    for path, why in zip(bad, whys):
        assert f"{path} ({why}" in msg
    skipped = []  # `cotmi report`: the finished runs, and one line for each directory skipped
    assert [r["_dir"] for r in load_runs(runs[:1] + bad, skipped.append)] == runs[:1]
    assert [line.split(" (")[0] for line in skipped] == [f"skipped {path}" for path in bad]
    with pytest.raises(UsageError, match="not finished runs: "):  # nothing left to report
        load_runs(bad, skipped.append)
    # The folder that holds the runs, given for them: the message says how to give them.
    with pytest.raises(UsageError, match=rf"^not finished runs: {tmp_path} \(a folder of 7 runs, not a run: give "
                                         rf"them as {tmp_path}/\*\)$"):
        load_runs([str(tmp_path)])


def test_cli_prints_and_writes_markdown_and_csv(runs, tmp_path):
    out = tmp_path / "report"
    proc = run_cotmi(["report", *runs, "--metric", "last", "--output_dir", str(out)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").read_text() in proc.stdout
    assert "| mi |" in proc.stdout and "n=2" in proc.stdout
    assert len(_rows((out / "report.csv").read_text())) == 4
    proc = run_cotmi(["report", runs[0], str(tmp_path / "nope")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    assert proc.stderr.strip() == f"warning: skipped {tmp_path / 'nope'} (no such directory)"
    proc = run_cotmi(["report", str(tmp_path / "nope")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"cotmi: error: not finished runs: {tmp_path / 'nope'} (no such directory)"
    proc = run_cotmi(["report", runs[0], "--metric", "best"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "--metric 'best' is not one of: best_valid, last, best_test, rationale_bleu, rationale_chrf" in proc.stderr


def test_write_report_writes_both_files(runs, tmp_path):
    markdown, md, table = write_report(runs, "best_valid", str(tmp_path / "r"))
    assert md.read_text() == markdown and table.read_text().startswith("model,mode,")


def test_own_data_is_a_column_named_for_the_data_and_a_shared_name_keeps_the_paths(tmp_path):
    def own(name, path, data_name, **kw):
        run = Path(_run(tmp_path, name, dataset=path, task="numeric", **kw))
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "dataset_name": data_name, "task": "numeric"}))
        return str(run)

    dirs = [own("dss", "/data/arith", "arith", mode="dss"), own("mi", "/data/arith", "arith", mode="mi"),
            _run(tmp_path, "mi-svamp", mode="mi")]
    markdown, _ = build_report(load_runs(dirs), "best_valid")
    assert "| mode | svamp | arith |\n|---|---|---|\n| dss | – | 60.00 (n=1) |\n| mi | 60.00 (n=1) | 60.00 (n=1) |" \
        in markdown
    other = own("mi-other", "/elsewhere/arith", "arith", mode="mi")
    markdown, _ = build_report(load_runs(dirs + [other]), "best_valid")
    assert "| mode | svamp | /data/arith | /elsewhere/arith |" in markdown
