"""--gradient_checkpointing: the same loss and gradients as without it (tiny T5, fp32, dropout 0),
with every encoder and decoder block recomputed in the backward and far fewer saved activations."""
import pytest
import torch
from torch import nn

from cotmi_ds.config import load_config
from cotmi_ds.model.student import DistillModel
from tests.conftest import random_batch, tiny_t5_config

V = 300


def _t5():
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(tiny_t5_config(V, dropout_rate=0.0))
    t5.lm_head.weight = nn.Parameter(torch.randn_like(t5.shared.weight))  # v1.1: a head of its own
    return t5.train()  # checkpointing only acts in training mode


def _run(checkpointing: bool, **flags):
    """Loss parts, gradients, block calls and bytes saved for the backward of one forward+backward."""
    t5 = _t5()
    model = DistillModel(t5, load_config(gradient_checkpointing=checkpointing, **flags))
    calls = {"n": 0}
    for stack in (t5.encoder, t5.decoder):
        for block in stack.block:
            # On the block's first sub-layer: the block's forward, not its __call__, is checkpointed;
            # a pre-hook, as a recomputation may stop early, once it has what the backward needs.
            block.layer[0].register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        parts = model(random_batch(V))
    forward_calls = calls["n"]
    parts["total"].backward()
    grads = {n: p.grad for n, p in t5.named_parameters() if p.grad is not None}
    return ({k: v.item() for k, v in parts.items()}, grads, forward_calls, calls["n"] - forward_calls,
            saved["bytes"])


@pytest.mark.parametrize("flags", [dict(loss="fused"), dict(loss="fused", encoder_once=False),
                                   dict(loss="reference"), dict(loss="fused", mode="dss"),
                                   dict(loss="fused", mode="standard")],
                         ids=["fused", "fused-two-encoder-calls", "reference", "fused-dss", "fused-label-only"])
def test_same_loss_and_gradients_with_less_saved_memory(flags):
    parts, grads, fwd, recomputed, saved = _run(False, **flags)
    parts_ck, grads_ck, fwd_ck, recomputed_ck, saved_ck = _run(True, **flags)
    assert parts_ck == pytest.approx(parts, rel=1e-6, abs=0)
    assert grads_ck.keys() == grads.keys() and len(grads) == len(list(_t5().parameters()))
    for name, g in grads.items():  # fp32 sums in another order: equal to rounding, relative to the tensor
        assert (grads_ck[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    # Without it no block runs in the backward; with it every block call is recomputed once.
    assert recomputed == 0 and fwd_ck == fwd and recomputed_ck == fwd
    assert saved_ck < 0.6 * saved, (saved_ck, saved)


def test_evaluation_mode_is_untouched():
    """Generation runs the model in eval mode: no checkpointing, no recomputation hooks."""
    t5 = _t5()
    DistillModel(t5, load_config(gradient_checkpointing=True))
    t5.eval()
    out = t5.generate(input_ids=random_batch(V)["pred_input_ids"], max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 4
