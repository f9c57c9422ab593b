"""`cotmi bench step` end to end: both sides run in their own processes and the report has both.
(The --gpu path's flags on tiny shapes in bf16 run in tests/e2e/test_gpu_check.py's dry run.)"""
import json
import re

import pytest

from tests.conftest import run_cotmi


def _bench_tiny(tmp_path, vocab: int, *flags: str) -> str:
    """`cotmi bench step` on a one-layer T5 with fixed-length batches (inputs 12, rationales 8,
    labels 3), 1 warm-up step and 2 rounds; its stdout."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 2, "num_layers": 1,
                                  "vocab_size": vocab, "feed_forward_proj": "gated-gelu",
                                  "tie_word_embeddings": False, "dropout_rate": 0.0}))
    proc = run_cotmi(["bench", "step", "--model_config", str(config), "--input_len", "12", "--rationale_len", "8",
                      "--label_len", "3", "--rounds", "2", "--warmup_steps", "1", *flags], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)  # shown by pytest if an assertion fails
    return proc.stdout


def test_bench_step_fp32_sides_train_alike_and_profile(tmp_path):
    """fp32, one process: the project side (ZeRO-0 under --ds_config auto, DeepSpeed's gradient
    all-reduce skipped) ends at the released step's loss; --profile prints each side's top operators."""
    out = _bench_tiny(tmp_path, 512, "--batch_size", "4", "--steps", "3", "--profile", "1")
    assert "DeepSpeed zero0)" in out and "precision fp32" in out
    rows = {m.group(1): m.group(0).split() for m in re.finditer(r"^(project|released) +\d.*$", out, re.M)}
    assert float(rows["project"][-1]) == pytest.approx(float(rows["released"][-1]), rel=1e-4)  # after 7 steps each
    for side in ("project", "released"):
        assert re.search(rf"^{side}: torch.profiler over 1 step\(s\).*\n-+.*\n +Name +Self CPU", out, re.M), side
    assert "aten::mm" in out
