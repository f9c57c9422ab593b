"""benchmarks/gpu_check.py --dry_run: every stage of the one-shot GPU check, on CPU with tiny shapes,
so that the script keeps working between the occasions someone has a GPU."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry_run", "--out", str(out)],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0 and summary["ok"], proc.stdout + json.dumps(summary, indent=1)
    assert list(summary["stages"]) == ["cuda_tests", "bench_loss", "bench_step", "student", "train"]
    assert "4 passed" in (out / "cuda_tests.log").read_text()  # fp32 x 2 variants, bf16, the engine
    train = summary["stages"]["train"]
    assert train["samples_per_s"] > 0 and train["peak_memory_gib"] > 0
    assert train["optimizer"]["torch_adam"] is True  # torch's AdamW: nothing compiled at run time
