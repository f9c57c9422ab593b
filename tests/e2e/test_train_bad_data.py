"""`cotmi train` on data that breaks only while its rows are read: one line, nothing written."""
from tests import dss_fixture as fx
from tests.conftest import run_cotmi
from tests.unit.test_data_cli import _one_error_line


def test_train_on_a_malformed_line_writes_no_run_and_no_cache(tmp_path):
    """The error is found after start-up, while reading rows: still one line, and nothing written."""
    data = tmp_path / "d"
    fx.write_cqa(data)
    path = data / "cqa" / "cqa_test.json"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace('"answer"', "answer")
    path.write_text("\n".join(lines) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cotmi(["train", "--dataset", "cqa", "--data_root", str(data), "--data_cache_dir", str(work / "cache"),
                      "--max_steps", "2"], cwd=work, timeout=300)
    _one_error_line(proc, f"{path}:4: not valid JSON (")
    assert list(work.iterdir()) == []
