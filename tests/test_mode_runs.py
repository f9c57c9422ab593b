"""Each mode trains a few steps on the embedded data (one process each) and writes its own loss
parts to TensorBoard, combined with the α and β given."""
import json

import pytest

from tests.conftest import run_cotmi
from tests.tb import read_scalars

pytestmark = pytest.mark.slow

SMALL = ["--scratch_d_model", "32", "--scratch_d_ff", "64", "--scratch_d_kv", "8", "--scratch_num_heads", "2",
         "--scratch_vocab_size", "128", "--synthetic_train_size", "64", "--synthetic_eval_size", "8",
         "--batch_size", "8", "--eval_batch_size", "8", "--max_new_tokens", "12", "--max_target_length", "40",
         "--max_steps", "4", "--log_every", "2", "--eval_every", "0"]

PARTS = {
    "standard": {"label_ce"}, "distill": {"label_ce"}, "single": {"single_ce"},
    "dss": {"label_ce", "rationale_ce"}, "mi": {"label_ce", "rationale_ce", "mi"},
}


@pytest.mark.parametrize("mode", list(PARTS))
def test_mode_trains_and_logs_its_loss_parts(mode, tmp_path):
    run = tmp_path / "run"
    proc = run_cotmi(["train", "--mode", mode, "--alpha", "0.3", "--beta", "0.2", "--output_dir", str(run),
                      "--data_cache_dir", str(tmp_path / "cache")] + SMALL, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars = read_scalars(run / "tb")
    losses = {tag[len("loss/"):] for tag in scalars if tag.startswith("loss/")}
    assert losses == PARTS[mode] | {"total"}
    for step in (0, 1):  # the two logged steps (2 and 4)
        v = {k: scalars[f"loss/{k}"][step][1] for k in losses}
        assert scalars["loss/total"][step][0] == 2 * (step + 1)
        if mode in ("standard", "distill"):
            expected = v["label_ce"]
        elif mode == "single":
            expected = v["single_ce"]
        else:
            expected = 0.3 * v["label_ce"] + 0.7 * v["rationale_ce"] + (0.2 * v["mi"] if mode == "mi" else 0.0)
        assert v["total"] == pytest.approx(expected, rel=1e-5)
    results = json.loads((run / "results.json").read_text())
    assert results["mode"] == mode and 0.0 <= results["test_accuracy"] <= 1.0
    assert results["zero_stage"] == 0 and results["world_size"] == 1  # --ds_config auto, one process
    assert results["data"]["label_type"] == ("llm" if mode == "distill" else "gt")
    assert "eval/test/accuracy" in scalars
    assert "training labels: " in proc.stdout and "tokenized-data cache: written" in proc.stdout
