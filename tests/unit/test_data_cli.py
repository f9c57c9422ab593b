"""`cotmi data stats` and the data errors as the user meets them: one line, exit 2, nothing written."""
import pytest

from cotmi_ds.config import load_config
from cotmi_ds.data.stats import dataset_stats
from tests import dss_fixture as fx
from tests.conftest import run_cotmi


def _one_error_line(proc, message):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cotmi: error: ") and message in lines[0], proc.stderr


def test_stats_on_a_fixture(tmp_path):
    fx.write_cqa(tmp_path, n_train=40)
    report = dataset_stats(load_config(dataset="cqa", data_root=str(tmp_path), scratch_vocab_size=96))
    lines = report.splitlines()
    assert lines[0] == f"cqa from {tmp_path} (task choice, --mode mi, training labels: gt)"
    train = next(line for line in lines if line.startswith("train: "))
    valid = next(line for line in lines if line.startswith("valid: "))
    test = next(line for line in lines if line.startswith("test: "))
    assert train.startswith("train: 36 rows") and valid.startswith("valid: 4 rows")
    assert "teacher label = gold 100.00% (6/6); placeholder labels (teacher output did not parse) 0" in test
    # Rows 1 (another choice) and 2 (no choice marker) disagree; row 2 fell back to the placeholder.
    fallbacks = sum(int(line.split("did not parse) ")[1].split(";")[0]) for line in (train, valid))
    assert fallbacks == 1
    assert sum(line.count("(") for line in lines if line.startswith(("    input", "    label", "    rationale"))) == 9
    assert "over the cap" in report and "(> 1024)" in report and "(> 256)" in report


def test_stats_on_the_real_data_with_a_missing_train_split(dss_root):
    report = dataset_stats(load_config(dataset="anli1", data_root=str(dss_root)))
    assert "missing (no gold file): train" in report
    assert "valid: 1,000 rows; teacher label = gold 66.80% (668/1,000); placeholder labels (teacher output did " \
           "not parse) 9" in report


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cqa", "--data_root", "{tmp}/nowhere"], "--data_root {tmp}/nowhere: no such directory"),
    (["--dataset", "svamp", "--data_root", "{data}"], "--data_root {data}: has no svamp/ folder"),
    (["--dataset", "cqa", "--data_root", "{data}", "--subsample", "1.5"], "--subsample must be in (0, 1], got 1.5"),
    (["--dataset", "esnli2"], "--dataset esnli2: no such file or folder, and not a built-in dataset (synthetic, "
                              "esnli, anli1, cqa, svamp); did you mean 'esnli'?"),
])
def test_train_fails_fast_on_bad_data_flags(tmp_path, args, message):
    data = tmp_path / "d"
    fx.write_cqa(data)
    work = tmp_path / "work"
    work.mkdir()
    fill = {"tmp": str(tmp_path), "data": str(data)}
    proc = run_cotmi(["train"] + [a.format(**fill) for a in args], cwd=work, timeout=120)
    _one_error_line(proc, message.format(**fill))
    assert list(work.iterdir()) == []


def test_train_names_the_missing_file(tmp_path):
    fx.write_cqa(tmp_path / "d")
    (tmp_path / "d" / "cqa" / "cqa_train.json").unlink()
    proc = run_cotmi(["train", "--dataset", "cqa", "--data_root", str(tmp_path / "d")], cwd=tmp_path, timeout=120)
    _one_error_line(proc, f"{tmp_path}/d/cqa/cqa_train.json: no such file")


def test_stats_names_both_counts(tmp_path, capsys):
    """Through the CLI entry point, in this process (the subprocess runs above cover start-up)."""
    from cotmi_ds.cli import main

    fx.write_cqa(tmp_path / "d")
    (tmp_path / "d" / "cqa" / "llm" / "test_CoT_1.json").write_text('["one more"]')
    with pytest.raises(SystemExit) as e:
        main(["data", "stats", "--dataset", "cqa", "--data_root", str(tmp_path / "d")])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("cotmi: error: ")
    assert "cqa_test.json: 6 rows but 4 teacher outputs in " in err[0]


def test_stats_through_the_cli(tmp_path, capsys):
    from cotmi_ds.cli import main

    fx.write_cqa(tmp_path / "d")
    main(["data", "stats", "--dataset", "cqa", "--data_root", str(tmp_path / "d"), "--scratch_vocab_size", "96"])
    out = capsys.readouterr().out
    assert "test: 6 rows; teacher label = gold 100.00% (6/6)" in out
