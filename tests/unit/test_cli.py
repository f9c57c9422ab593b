"""The CLI as a user meets it: one line on stderr, exit code 2, and nothing written."""
import pytest

from tests.conftest import run_cotmi


@pytest.mark.parametrize("args, message", [
    (["train", "--lrr", "1"], "cotmi: error: unknown flag --lrr (did you mean 'lr'?)"),
    (["train", "--mode", "nope"], "cotmi: error: --mode 'nope' is not one of: standard, distill, single, dss, mi"),
    (["train", "--precision", "fp16"], "fp16 is refused for T5 students: T5's activations overflow"),
    (["train", "--ds_config", "zero9"], "--ds_config zero9: no such file, and not a name in"),
    (["train", "--config", "nofile.yaml"], "--config nofile.yaml: no such file or preset"),
    (["train", "--loss_chunk_mib", "inf"], "--loss_chunk_mib must be a finite number, got inf"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, message, tmp_path, without_torch):
    proc = run_cotmi(args, cwd=tmp_path, timeout=120, **without_torch)  # and before any heavy import
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and message in lines[-1], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_run_dir_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    proc = run_cotmi(["train", "--output_dir", str(run)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr.splitlines()[-1]
    assert [p.name for p in run.iterdir()] == ["results.json"]


def test_help_lists_the_flags(tmp_path):
    proc = run_cotmi(["train", "--help"], cwd=tmp_path, timeout=60, PAGER="cat")
    assert "--max_steps" in proc.stdout + proc.stderr and "--ds_config" in proc.stdout + proc.stderr


@pytest.mark.parametrize("command, line", [
    (["plan"], "--headroom (default 0.1; [0, 1)): fraction of the GPU memory kept free"),
    (["bench", "memory"], "--stages (default '0,2,3'): ZeRO stages"),
])
def test_plan_and_bench_help_is_generated_from_their_options(command, line, tmp_path, without_torch):
    proc = run_cotmi([*command, "--help"], cwd=tmp_path, timeout=60, PAGER="cat", **without_torch)
    assert line in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_an_output_dir_that_cannot_be_created_is_one_line_before_data_preparation(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    proc = run_cotmi(["train", "--output_dir", str(tmp_path / "file" / "run")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"cotmi: error: --output_dir {tmp_path / 'file' / 'run'}: cannot be created "
                     f"({tmp_path / 'file'} is not a directory)"], proc.stderr
    assert "prepared in" not in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
