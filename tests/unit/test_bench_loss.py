"""`cotmi bench loss`: bad flags are one-line usage errors; a tiny run prints both tables with figures."""
import re

import pytest

from tests.conftest import run_cotmi


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "--device cuda: no GPU is visible to torch"),
    (["--dtype", "fp16"], "--dtype 'fp16' is not one of: fp32, bf16"),
    (["--batchsize", "4"], "unknown flag --batchsize for `cotmi bench loss`"),
    (["--steps", "1"], "--steps must be >= 2"),
])
def test_bench_loss_usage_errors(args, message, tmp_path):
    proc = run_cotmi(["bench", "loss", *args], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.slow
def test_bench_loss_prints_both_tables_with_ratios(tmp_path):
    proc = run_cotmi(["bench", "loss", "--batch", "2", "--rationale_len", "16", "--label_len", "4", "--input_len", "8",
                      "--vocab", "500", "--d_model", "32", "--repeats", "1", "--steps", "2"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Loss alone" in out and "MI training step" in out and out.startswith("machine: ")
    number = r"\s+[\d.,]+"
    for name in ("reference", "fused", "fused, encoder x2"):
        assert re.search(rf"^{re.escape(name)}{number}{number}{number}$", out, re.M), (name, out)
    ratios = re.findall(r"^fused/reference\s+([\d.]+)x\s+([\d.]+)x$", out, re.M)
    assert len(ratios) == 2 and all(float(x) > 0 for pair in ratios for x in pair), out
    assert "running the encoder once for both prefixes saved" in out
