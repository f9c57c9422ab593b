"""`cotmi sweep --local`: the cells run here, an unfinished one resumes, the report is written."""
import json

from tests.conftest import run_cotmi
from tests.e2e.test_mode_runs import SMALL


def test_local_sweep_runs_resumes_and_reports(tmp_path):
    fixed = {k.lstrip("-"): v for k, v in zip(SMALL[::2], SMALL[1::2])}
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"fixed": {**fixed, "data_cache_dir": str(tmp_path / "cache")},
                                "grid": {"mode": ["dss", "mi"]}}))
    out = tmp_path / "sweep"
    cmd = ["sweep", str(grid), "--out", str(out), "--local"]
    proc = run_cotmi(cmd, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 cells, 0 finished, 2 to run on this machine: 1 CPU rank(s) each, 1 at once" in proc.stdout
    assert "all 2 cells finished; wrote" in proc.stdout
    table = (out / "report.md").read_text()
    assert "| dss |" in table and "| mi |" in table, table
    for mode in ("dss", "mi"):  # the layout of a Slurm sweep
        run = out / "runs" / f"mode-{mode}"
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
        assert (run / "results.json").is_file() and (run / "checkpoints").is_dir()
    # A cell whose run did not finish is run again (from its checkpoint); the finished one is skipped.
    (out / "runs" / "mode-mi" / "status.json").unlink()
    again = run_cotmi(cmd, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 cells, 1 finished, 1 to run" in again.stdout and "cell 1 (mode-mi) started on CPU" in again.stdout
    assert "cell 1 (mode-mi) finished (exit code 0" in again.stdout and "cell 0" not in again.stdout
    assert "resumed from" in (out / "logs" / "local-1.log").read_text()
