"""The README's main command, `cotmi train` on its built-in default, genuinely learns the task."""
import json

import torch

from tests.conftest import library_lines, run_cotmi


def test_default_run_learns_far_beyond_the_majority_label(tmp_path):
    # One thread, as every test process (conftest.child_env): on 2 cores beside the other workers a
    # second thread bought this run 13% of wall time for 60% more CPU time (237 vs 379 CPU-s alone).
    proc = run_cotmi(["train", "--output_dir", str(tmp_path / "demo")], cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["mode"] == "mi" and results["dataset"] == "synthetic"
    assert results["test_accuracy"] >= 0.6, results
    assert results["test_accuracy"] >= 20 * max(results["majority_label_test_accuracy"], 0.01)
    assert "test accuracy" in proc.stdout.splitlines()[-1]
    assert library_lines(proc.stdout + proc.stderr) == []  # the product's lines only
    # What the figures depend on beyond the flags, printed and kept (one thread: conftest.child_env).
    assert results["numerics"] == {"torch": torch.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
                                   "threads": 1, "subnormals": "flushed"}
    assert f"numerics: seed 0, torch {torch.__version__}, cpu_kernels " in proc.stdout
