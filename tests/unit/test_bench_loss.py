"""`cotmi bench loss`: bad flags are one-line usage errors. (A tiny run printing both tables is part
of tests/e2e/test_gpu_check.py's dry run.)"""
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

