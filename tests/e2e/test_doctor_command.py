"""`cotmi doctor` as a job runs it: one line per check, exit code 1 when any fails."""
from tests.conftest import TINY, library_lines, run_cotmi


def test_the_command_prints_one_line_per_check_and_fails_on_any(tmp_path):
    # (tests/e2e/test_install.py runs it where everything passes)
    bad = run_cotmi(["doctor", *TINY, "--gpus", "2", "--output_dir", str(tmp_path / "run")], cwd=tmp_path,
                    timeout=300, DS_ACCELERATOR=None)  # unset, as for a user: DeepSpeed is told, not left to guess
    assert library_lines(bad.stdout + bad.stderr) == [] and bad.stderr == ""
    assert bad.returncode == 1 and "FAIL  gpus: 2 asked for, none visible" in bad.stdout, bad.stdout
    assert bad.stdout.count("  ok    ") == 7 and "doctor: 2 of 9 checks failed" in bad.stdout  # gpus, nccl
    assert not any((tmp_path / "run").iterdir())  # the probe leaves nothing behind
