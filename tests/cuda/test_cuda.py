"""On a GPU: the fused loss against the reference in fp32 and bf16 (values and gradients) at
T5-base shapes, and torch's fused AdamW inside the DeepSpeed engine (nothing compiled at run time).
Skipped without CUDA; COTMI_TEST_DEVICE=cpu runs them on CPU with tiny shapes (the dry run of
benchmarks/gpu_check.py does, so that they keep working)."""
import os

import pytest
import torch

from cotmi_ds.losses.fused import fused_losses
from tests.unit.test_fused_loss import assert_close_rel, grads, make_case, reference_parts

DEVICE = torch.device(os.environ.get("COTMI_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
# T5-base: d 768, vocab 32,128; rationales of 256 tokens. Tiny on CPU.
SHAPES = dict(B=8, T_lab=8, T_rat=256, V=32128, d=768) if DEVICE.type == "cuda" else dict(B=2, T_lab=3, T_rat=12, V=300, d=16)
WEIGHTS = {"label_ce": 0.5, "rationale_ce": 0.5, "mi": 0.1}


def on_device(case):
    W, h_lab, y_lab, h_rat, y_rat = case
    leaf = [t.detach().to(DEVICE).requires_grad_() for t in (W, h_lab, h_rat)]
    return leaf[0], leaf[1], y_lab.to(DEVICE), leaf[2], y_rat.to(DEVICE)


@pytest.mark.parametrize("variant", ["paper", "masked"])
def test_fused_equals_reference_fp32(variant):
    W, h_lab, y_lab, h_rat, y_rat = on_device(make_case(0, **SHAPES, scale=2.0))
    fused = fused_losses(W, h_lab, y_lab, h_rat, y_rat, mi_variant=variant, chunk_mib=8)
    ref = reference_parts(W, h_lab, y_lab, h_rat, y_rat, variant)
    for k in ref:
        assert fused[k].item() == pytest.approx(ref[k].item(), rel=1e-4, abs=1e-6), k
    for name, a, b in zip(("dW", "dh_lab", "dh_rat"), grads(fused, WEIGHTS, (W, h_lab, h_rat)),
                          grads(ref, WEIGHTS, (W, h_lab, h_rat))):
        assert_close_rel(a, b, 1e-4, name)


def test_fused_bf16_within_documented_tolerance():
    """As tests/unit's bf16 test: against the exact loss of the same bf16 inputs, loss parts within
    2e-3 relative, gradients within 2e-2 of their largest entry, and no worse than the reference in bf16."""
    W, h_lab, y_lab, h_rat, y_rat = on_device(make_case(3, **SHAPES, dtype=torch.bfloat16, scale=2.0))
    inputs32 = [t.detach().float().requires_grad_() for t in (W, h_lab, h_rat)]
    exact = reference_parts(inputs32[0], inputs32[1], y_lab, inputs32[2], y_rat, "paper")
    exact_grads = grads(exact, WEIGHTS, inputs32)
    fused = fused_losses(W, h_lab, y_lab, h_rat, y_rat, chunk_mib=8)
    ref16 = reference_parts(W, h_lab, y_lab, h_rat, y_rat, "paper")
    for k in exact:
        err, err16 = abs(fused[k].item() - exact[k].item()), abs(ref16[k].item() - exact[k].item())
        assert err <= 2e-3 * abs(exact[k].item()) and err <= max(2 * err16, 1e-4), (k, err, err16)
    for name, f, r, e in zip(("dW", "dh_lab", "dh_rat"), grads(fused, WEIGHTS, (W, h_lab, h_rat)),
                             grads(ref16, WEIGHTS, (W, h_lab, h_rat)), exact_grads):
        assert f.dtype == torch.bfloat16
        scale = e.abs().max()
        err, err16 = (f.float() - e).abs().max() / scale, (r.float() - e).abs().max() / scale
        assert err <= 2e-2 and err <= 2 * err16 + 1e-3, (name, err.item(), err16.item())


@pytest.mark.parametrize("stage", ["zero0", "zero2", "zero3"] if DEVICE.type == "cuda" else ["zero2"])
def test_the_engine_trains_with_torchs_fused_adamw(stage, tiny_tokenizer):
    from cotmi_ds.config import load_config
    from cotmi_ds.distributed import init_distributed
    from cotmi_ds.model.student import DistillModel
    from cotmi_ds.ds_configs import choose_ds_config
    from cotmi_ds.training.engine import create_engine
    from tests.conftest import tiny_t5_config
    from tests.unit.test_fused_loss import _batch
    from transformers import T5ForConditionalGeneration

    env = init_distributed(120)
    precision = "bf16" if DEVICE.type == "cuda" else "fp32"
    cfg = load_config(ds_config=stage, mode="mi", batch_size=4, lr=1e-2, max_steps=5)
    torch.manual_seed(0)
    model = DistillModel(T5ForConditionalGeneration(tiny_t5_config(len(tiny_tokenizer))), cfg)
    ds_config = choose_ds_config(cfg.ds_config, env.world_size).fill(cfg, env, precision, 32)
    engine = create_engine(model, ds_config, cfg, env.world_size).ds
    assert type(engine.basic_optimizer) is torch.optim.AdamW
    assert engine.basic_optimizer.defaults["fused"] is True  # on CPUs too
    batch = {k: v.to(env.device) if torch.is_tensor(v) else v for k, v in _batch(tiny_tokenizer).items()}
    losses = []
    for _ in range(5):
        loss = engine(batch)["total"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
