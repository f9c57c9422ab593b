"""Each mode trains a few steps on the embedded data (one process each) and writes its own loss
parts to TensorBoard, combined with the α and β given. Two of them train in bf16 (at ZeRO-0, and at
ZeRO-2 with gradient accumulation): their own model/ export and `cotmi export` of their final
checkpoint hold the same fp32 master weights."""
import json
import math
import re

import pytest
import torch

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


BF16 = {"standard": ["--precision", "bf16", "--ds_config", "zero0"],
        "single": ["--precision", "bf16", "--ds_config", "zero2", "--grad_accum", "2"]}
# distill: ZeRO-0 in fp32 (the bare torch optimizer) with a finite loss but NaN gradients in one
# micro-batch: that update is skipped and reported, and training goes on.
NAN_GRAD = {"distill": 2}


@pytest.mark.parametrize("mode", list(PARTS))
def test_mode_trains_and_logs_its_loss_parts(mode, tmp_path):
    run = tmp_path / "run"
    faults = {"module": "tests.faults", "COTMI_FAULT_NAN_GRAD": f"0:{NAN_GRAD[mode]}"} if mode in NAN_GRAD else {}
    zero0 = ["--ds_config", "zero0"] if mode in NAN_GRAD else []
    proc = run_cotmi(["train", "--mode", mode, "--alpha", "0.3", "--beta", "0.2", "--output_dir", str(run),
                      "--data_cache_dir", str(tmp_path / "cache")] + SMALL + BF16.get(mode, []) + zero0,
                     cwd=tmp_path, timeout=600, **faults)
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
    assert {"eval/test/ece_equal_mass", "eval/test/first_token_ece_equal_mass"} <= set(scalars)
    # Rationale quality (the default --eval_rationales covers all 8 examples): modes with a rationale
    # pass score it in TensorBoard, results.json and the final line; the others report none.
    tags = {f"eval/{s}/rationale_{m}" for s in ("valid", "test") for m in ("bleu", "chrf")}
    final = results["evaluations"][-1]["test"]
    done = proc.stdout.strip().splitlines()[-1]
    if "rationale_ce" in PARTS[mode]:
        assert tags <= set(scalars)
        assert final["rationale_examples"] == 8 and 0.0 <= final["rationale_chrf"] <= 100.0
        for m in ("bleu", "chrf"):
            assert results[f"rationale_{m}_last"] == results[f"rationale_{m}_at_best_valid"] == final[f"rationale_{m}"]
            assert scalars[f"eval/test/rationale_{m}"][-1][1] == pytest.approx(final[f"rationale_{m}"], rel=1e-6)
        assert f"rationales BLEU {final['rationale_bleu']:.1f} chrF {final['rationale_chrf']:.1f}" in done
    else:
        assert not tags & set(scalars) and "rationale_chrf_last" not in results and "rationale" not in done
    assert "training labels: " in proc.stdout and "tokenized-data cache: written" in proc.stdout
    if mode in BF16:
        assert_exports_hold_the_fp32_masters(run, tmp_path)
    if mode in NAN_GRAD:
        assert re.search(r"^step \d: non-finite gradients \(on at least one rank\); the update was skipped, "
                         r"1 in a row, 1 in total$", proc.stdout, re.M), proc.stdout[-3000:]
        meta = json.loads((run / "checkpoints" / "step-4" / "cotmi_checkpoint.json").read_text())
        assert meta["engine"]["skipped_steps"] == 1 and meta["engine"]["global_steps"] == 4
        assert all(math.isfinite(v[1]) for v in scalars["loss/total"])  # training went on


def assert_exports_hold_the_fp32_masters(run, tmp_path):
    from safetensors.torch import load_file

    proc = run_cotmi(["export", str(run), str(tmp_path / "hf")], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    own, exported = load_file(run / "model" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert own.keys() == exported.keys() and all(torch.equal(own[k], exported[k]) for k in own)
    assert {v.dtype for v in own.values()} == {torch.float32}
    # Training moved the masters off bf16's grid; the bf16 weights the forward used are their rounding.
    assert all((v.to(torch.bfloat16).float() != v).any() for v in own.values())
    for folder in (run / "model", tmp_path / "hf"):
        config = json.loads((folder / "config.json").read_text())
        assert config["dtype"] == "float32"
        assert config["cotmi_export"]["weights"] == "fp32 master weights of a bf16 run"
        assert config["cotmi_export"]["step"] == 4
    states = run / "checkpoints" / "step-4" / "mp_rank_00_model_states.pt"
    module = torch.load(states, map_location="cpu", weights_only=True)["module"]
    assert module["t5.shared.weight"].dtype == torch.bfloat16
    assert torch.equal(own["shared.weight"].to(torch.bfloat16), module["t5.shared.weight"])
