"""`cotmi sweep` without Slurm: the grid, the cells' files, skipping finished cells, the sbatch line."""
import json

import pytest

from cotmi_ds.cluster.sweep import array_spec, cell_name, plan_sweep, run_sweep
from cotmi_ds.errors import UsageError
from tests.conftest import REPO, run_cotmi


def write_grid(path, fixed=None, grid=None):
    path.write_text(json.dumps({"fixed": fixed or {"max_steps": 5}, "grid": grid or {"mode": ["dss", "mi"],
                                                                                       "seed": [0, 1]}}))
    return str(path)


def test_cells_are_every_combination_with_their_flags_and_run_dirs(tmp_path):
    grid = write_grid(tmp_path / "g.json", fixed={"config": "paper", "dataset": "synthetic"},
                      grid={"model": ["google/t5-v1_1-small"], "mode": ["dss", "mi"], "seed": [0, 1]})
    root, pending, total = plan_sweep(grid, str(tmp_path / "sw"))
    assert (total, pending) == (4, [0, 1, 2, 3])
    args = (root / "cells" / "3.args").read_text().split("\n")
    assert args[:2] == ["--config", "paper"]
    assert "--mode" in args and args[args.index("--mode") + 1] == "mi" and args[args.index("--seed") + 1] == "1"
    run_dir = (root / "cells" / "3.rundir").read_text().strip()
    assert run_dir == str(root / "runs" / "model-google-t5-v1-1-small_mode-mi_seed-1")


def test_finished_cells_are_skipped_and_the_array_is_compact(tmp_path, capsys):
    grid = write_grid(tmp_path / "g.json")
    root, pending, _ = plan_sweep(grid, str(tmp_path / "sw"))
    done = root / "runs" / cell_name({"mode": "dss", "seed": 1})
    done.mkdir(parents=True)
    (done / "status.json").write_text(json.dumps({"status": "completed"}))
    preempted = root / "runs" / cell_name({"mode": "mi", "seed": 0})
    preempted.mkdir(parents=True)
    (preempted / "status.json").write_text(json.dumps({"status": "preempted"}))
    assert plan_sweep(grid, str(tmp_path / "sw"))[1] == [0, 2, 3]
    run_sweep(grid, str(tmp_path / "sw"), submit=False, sbatch_args="--partition gpu --time 1:00:00",
              max_parallel=2, template=None)
    line = capsys.readouterr().out
    assert "4 cells, 1 finished, 3 to run" in line and "--array=0,2-3%2" in line
    assert f"COTMI_SWEEP_DIR={root}" in line and "--partition gpu --time 1:00:00" in line
    assert line.rstrip().endswith("(not submitted: pass --submit to run it)")


def test_array_spec():
    assert array_spec([0, 1, 2, 5, 7, 8], 0) == "0-2,5,7-8"
    assert array_spec([4], 3) == "4%3"


@pytest.mark.parametrize("content, message", [
    ({"fixed": {}, "grid": {"mode": ["dss"]}, "extra": 1}, "unknown key 'extra'"),
    ({"grid": {}}, "'grid' a non-empty mapping"),
    ({"grid": {"mode": "mi"}}, "grid.mode must be a non-empty list"),
    ({"fixed": {"mode": "mi"}, "grid": {"mode": ["dss"]}}, "'mode' is both fixed and in the grid"),
    ({"grid": {"mode": ["dss", "mmi"]}}, "cell mode-mmi: --mode 'mmi' is not one of"),
    ({"grid": {"lrr": [1.0]}}, "unknown flag --lrr (did you mean 'lr'?)"),
    ({"fixed": {"output_dir": "x"}, "grid": {"mode": ["mi"]}}, "output_dir and resume are set by the sweep"),
])
def test_bad_grids_are_named_and_nothing_is_written(tmp_path, content, message):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps(content))
    with pytest.raises(UsageError) as e:
        plan_sweep(str(grid), str(tmp_path / "sw"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "sw").exists()


def test_a_sweep_directory_of_another_grid_is_refused(tmp_path):
    plan_sweep(write_grid(tmp_path / "a.json"), str(tmp_path / "sw"))
    other = write_grid(tmp_path / "b.json", grid={"mode": ["mi"]})
    with pytest.raises(UsageError, match="holds a sweep of a different grid"):
        plan_sweep(other, str(tmp_path / "sw"))


def test_a_line_break_in_a_grid_value_cannot_smuggle_in_flags(tmp_path):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"grid": {"tokenizer": ["none\n--output_dir\n/tmp/elsewhere"]}}))
    with pytest.raises(UsageError) as e:
        plan_sweep(str(grid), str(tmp_path / "sw"))
    assert str(e.value) == f"{grid}: tokenizer: a line break or NUL in a name or value is not allowed"
    assert not (tmp_path / "sw").exists()


def test_cell_files_are_replaced_atomically(tmp_path):
    # A task of the job array may be reading its cell file while the sweep is planned again: it
    # must see the old file or the new one, never a truncated one (a new inode, not an overwrite).
    grid = write_grid(tmp_path / "g.json")
    plan_sweep(grid, str(tmp_path / "sw"))
    cells = tmp_path / "sw" / "cells"
    before = {p.name: p.stat().st_ino for p in cells.iterdir()}
    plan_sweep(grid, str(tmp_path / "sw"))
    after = {p.name: p.stat().st_ino for p in cells.iterdir()}
    assert before.keys() == after.keys() and all(before[k] != after[k] for k in before)


def test_local_slots_share_no_gpu(monkeypatch):
    from cotmi_ds.cluster.local import slots

    assert slots(["0", "1", "2", "3"], 2, 0) == [["0", "1"], ["2", "3"]]
    assert slots(["4", "5", "6"], 1, 2) == [["4"], ["5"]]
    assert slots([], 0, 3) == [[], [], []] and slots([], 0, 0) == [[]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(UsageError, match=r"--gpus_per_cell 4: this machine has 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=4,5\)"):
        slots(["4", "5"], 4, 0)


def test_the_command_takes_the_sweep_directory_as_out_as_its_help_and_the_docs_say(tmp_path):
    """Help, docs and errors agree: GRID, then --out DIR; the grid's format is in docs/slurm.md."""
    shown = run_cotmi(["sweep", "--help"], cwd=tmp_path, timeout=60, PAGER="cat")
    help_text = shown.stdout + shown.stderr
    assert "cotmi sweep GRID <flags>" in help_text and "--out=OUT" in help_text and "docs/slurm.md" in help_text
    assert "cotmi sweep grid.yaml --out runs/sweep1" in (REPO / "docs" / "slurm.md").read_text()
    grid = write_grid(tmp_path / "g.json")
    for args, message in [([grid], "cotmi sweep needs --out DIR, the sweep directory"),
                          ([str(tmp_path / "nope.yaml"), "--out", "sw"], "GRID " + str(tmp_path / "nope.yaml") +
                           ": no such file (a YAML/JSON file of fixed: and grid:, as in docs/slurm.md)")]:
        proc = run_cotmi(["sweep", *args], cwd=tmp_path, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(f"cotmi: error: {message}") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "sw").exists()
