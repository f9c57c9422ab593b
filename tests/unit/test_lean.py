"""--lean_layers: T5's RMSNorm and gelu_new as single autograd operations. The same function and
gradients as transformers' layers (fp64 gradcheck; a whole student's loss and gradients), fewer
bytes kept for the backward, and nothing changed in what is saved or exported."""
import copy

import pytest
import torch
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers.activations import NewGELUActivation
from transformers.models.t5.modeling_t5 import T5LayerNorm

from cotmi_ds.config import load_config
from cotmi_ds.model.lean import GELUTanh, LeanT5LayerNorm, _RMSNormFn, make_lean
from cotmi_ds.model.student import DistillModel
from tests.conftest import random_batch, tiny_t5_config

V = 300


def _t5(**overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(tiny_t5_config(V, **overrides))
    t5.lm_head.weight = nn.Parameter(torch.randn_like(t5.shared.weight))
    for m in t5.modules():  # T5 initialises the norms to 1: draw them, so their gradients are tested
        if isinstance(m, T5LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
    return t5.train()


def test_rmsnorm_gradients_are_exact_in_fp64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6), (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_t5_layernorm(dtype):
    """Forward bit-equal; gradients to rounding, and in bf16 no further from the fp64 truth than
    transformers' own (which rounds the intermediate gradients to bf16)."""
    torch.manual_seed(0)
    ref = T5LayerNorm(64)
    ref.weight.data = torch.empty(64).uniform_(0.5, 1.5).to(dtype)
    lean = copy.deepcopy(ref)
    lean.__class__ = LeanT5LayerNorm
    x = (3 * torch.randn(4, 7, 64)).to(dtype)
    g = torch.randn(4, 7, 64).to(dtype)
    grads = {}
    for name, m in (("ref", ref), ("lean", lean)):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        grads[name] = (y.detach(), xi.grad, m.weight.grad)
    assert grads["lean"][0].dtype == grads["ref"][0].dtype == dtype
    assert torch.equal(grads["lean"][0], grads["ref"][0])
    truth = T5LayerNorm(64).double()
    truth.weight.data = ref.weight.data.double()
    xt = x.double().requires_grad_()
    truth(xt).backward(g.double())
    for i, exact in ((1, xt.grad), (2, truth.weight.grad)):
        err_lean = (grads["lean"][i].double() - exact).abs().max()
        err_ref = (grads["ref"][i].double() - exact).abs().max()
        scale = exact.abs().max()
        if dtype == torch.float32:
            assert err_lean <= 1e-6 * scale
        else:
            assert err_lean <= err_ref + 1e-6 * scale


def test_make_lean_swaps_every_norm_and_activation_in_place():
    t5 = _t5()
    params = dict(t5.named_parameters())
    keys = list(t5.state_dict())
    norms = sum(type(m) is T5LayerNorm for m in t5.modules())
    acts = sum(type(m) is NewGELUActivation for m in t5.modules())
    assert norms == 2 * 2 + 3 * 2 + 2 and acts == 4  # per layer (2 enc, 3 dec), final norms; gated FFNs
    assert make_lean(t5) == norms + acts
    assert not any(type(m) in (T5LayerNorm, NewGELUActivation) for m in t5.modules())
    assert sum(isinstance(m, LeanT5LayerNorm) for m in t5.modules()) == norms
    assert sum(isinstance(m, GELUTanh) for m in t5.modules()) == acts
    # The same parameter objects under the same names: optimizers, DeepSpeed and exports see no change.
    assert list(t5.state_dict()) == keys
    assert all(p is params[n] for n, p in t5.named_parameters())
    assert make_lean(t5) == 0


def _step(lean: bool, **flags):
    t5 = _t5()
    model = DistillModel(t5, load_config(lean_layers=lean, **flags))
    saved = {"bytes": 0}
    weights = {p.data_ptr() for p in t5.parameters()}

    def pack(t):
        if t.data_ptr() not in weights:
            saved["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        parts = model(random_batch(V))
    parts["total"].backward()
    grads = {n: p.grad for n, p in t5.named_parameters()}
    return t5, {k: v.item() for k, v in parts.items()}, grads, saved["bytes"]


@pytest.mark.parametrize("flags", [dict(loss="fused"), dict(loss="reference"),
                                   dict(loss="fused", gradient_checkpointing=True)],
                         ids=["fused", "reference", "checkpointing"])
def test_student_loss_and_gradients_unchanged_with_fewer_saved_bytes(flags):
    t5_plain, parts, grads, saved = _step(False, **flags)
    t5_lean, parts_lean, grads_lean, saved_lean = _step(True, **flags)
    assert not any(isinstance(m, LeanT5LayerNorm) for m in t5_plain.modules())
    assert any(isinstance(m, LeanT5LayerNorm) for m in t5_lean.modules())
    assert parts_lean == pytest.approx(parts, rel=1e-6, abs=0)
    for name, g in grads.items():
        assert grads_lean[name] is not None, name
        assert (grads_lean[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    if not flags.get("gradient_checkpointing"):  # with it, only block inputs are kept either way
        assert saved_lean < 0.8 * saved, (saved_lean, saved)


def test_export_is_a_plain_t5(tmp_path):
    """save_pretrained of a lean student: transformers' own classes and config on reload, the same
    outputs."""
    t5 = _t5().eval()
    make_lean(t5)
    t5.save_pretrained(tmp_path)
    back = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert back.config.dense_act_fn == "gelu_new"
    assert not any(isinstance(m, (LeanT5LayerNorm, GELUTanh)) for m in back.modules())
    batch = random_batch(V)
    with torch.no_grad():
        a = t5(input_ids=batch["pred_input_ids"], labels=batch["labels"].clamp(min=0)).logits
        b = back(input_ids=batch["pred_input_ids"], labels=batch["labels"].clamp(min=0)).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
