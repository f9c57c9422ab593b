"""The fused loss under ZeRO-3 at 2 CPU ranks, where the LM-head weight is partitioned: T5 v1.0
(head tied to the embeddings, output scaled) and v1.1 (own head) train exactly as the reference.
One torchrun launch runs all four engines (see fused_zero3_worker.py), and also takes the first bf16
AdamW update at ZeRO 0-3 on two ranks."""
import json
import sys
from pathlib import Path

import pytest

from cotmi_ds.distributed import reserved_port
from tests.conftest import child_env, run_in_own_session


WORKER = Path(__file__).with_name("fused_zero3_worker.py")
STEPS = 5


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "curves.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    with reserved_port() as port:
        cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), str(WORKER), str(out), str(STEPS)]
        proc = run_in_own_session(cmd, env=child_env(), timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_zero3_fused_loss_curve_is_the_reference_curve(curves, head):
    fused, ref = curves[f"{head}/fused"], curves[f"{head}/reference"]
    assert fused["tied"] is ref["tied"] is (head == "tied")
    # The head weight really is partitioned (nothing local outside a gather), so the fused loss
    # only sees it because DistillModel registers it with ZeRO-3.
    assert fused["head_numel_local"] == 0 and fused["head_numel_full"] == 96 * 32
    # Built under zero.Init: no weight was ever whole on a rank outside a gather.
    assert fused["built_local_numel"] == ref["built_local_numel"] == 0
    assert len(fused["loss"]) == len(ref["loss"]) == STEPS
    for step, (a, b) in enumerate(zip(fused["loss"], ref["loss"])):
        assert a.keys() == b.keys() == {"label_ce", "rationale_ce", "mi", "total"}
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5), (step, k)
    # Later steps differ from the first: the weights (the head included) were updated identically.
    assert fused["loss"][-1]["total"] != pytest.approx(fused["loss"][0]["total"], rel=1e-3)


def test_zero3_activation_checkpointing_curve_is_the_curve_without_it(curves):
    with_it, without = curves["untied/fused+checkpointing"], curves["untied/fused"]
    assert with_it["checkpointing"] and not without["checkpointing"]
    assert with_it["head_numel_local"] == 0
    for step, (a, b) in enumerate(zip(with_it["loss"], without["loss"], strict=True)):
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=1e-5), (step, k)


def test_zero3_loads_a_saved_student_slice_by_slice(curves):
    loaded = curves["pretrained"]
    assert loaded["local_numel"] == 0  # created partitioned
    assert loaded["shards"] >= 2 and loaded["own_head"]
    # Every tensor is from_pretrained's (the own head included); full shapes and count.
    assert loaded["keys_equal"] and loaded["equal"] and loaded["same_identity"]
    # Rank 0 read its half of every weight (at most two rows of 64 elements more each), not the model.
    (read,) = loaded["read"]
    assert loaded["elements"] / 2 <= read <= loaded["elements"] / 2 + loaded["tensors"] * 2 * 64


@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2", "zero3"])
def test_first_bf16_update_on_two_ranks_is_torch_adamws(curves, stage):
    """No AdamW step before training at any stage (bf16 ZeRO-0's priming step is undone), and the
    first update of the fp32 masters is torch's AdamW's on the ranks' mean gradient."""
    first = curves["first_updates"][stage]
    assert first["before"] in ([], [0]) and first["after"] == [1], first
    assert first["max_diff"] < 1e-7, first
