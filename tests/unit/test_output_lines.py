"""What the commands print is the product's own lines: no library's warnings, log lines or progress
bars among them (DeepSpeed's accelerator guess, datasets' bars on a pipe). `cotmi doctor` and the
default training run are checked where the end-to-end tests run them."""
from tests.conftest import library_lines, run_cotmi


def test_plan_and_data_prepare_print_only_their_own_lines(tmp_path):
    # DS_ACCELERATOR unset, as for a user: DeepSpeed then guesses its accelerator, and says so, unless told.
    plan = run_cotmi(["plan", "--model", "google/t5-v1_1-small"], cwd=tmp_path, timeout=120, DS_ACCELERATOR=None)
    assert plan.returncode == 0 and plan.stdout.startswith("student: 76,961,152 parameters"), plan.stderr
    prepare = run_cotmi(["data", "prepare", "--synthetic_train_size", "64", "--synthetic_eval_size", "8",
                         "--data_cache", "false"], cwd=tmp_path, timeout=120, DS_ACCELERATOR=None)
    assert prepare.returncode == 0 and "prepared in" in prepare.stdout, prepare.stderr
    for proc in (plan, prepare):
        assert library_lines(proc.stdout + proc.stderr) == [] and proc.stderr == ""
