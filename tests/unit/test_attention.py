"""--attention sdpa: T5's attention through torch's scaled_dot_product_attention, with the relative
position bias and the padding mask as one additive mask. In fp64 its values and gradients are
eager attention's (tied and untied students; encoder, decoder self- and cross-attention; the whole
training step; generation with the cache), the SDPA kernel really runs, and exports stay plain T5."""
import json

import pytest
import torch
from torch import nn
from transformers import T5ForConditionalGeneration

from cotmi_ds.config import load_config
from cotmi_ds.model.student import DistillModel
from tests.conftest import random_batch, tiny_t5_config

V = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def _t5(tied: bool) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(tiny_t5_config(V, tie_word_embeddings=tied, num_heads=3))
    if not tied:  # transformers 5 ties the head of any model built from a config; v1.1 checkpoints do not
        t5.lm_head.weight = nn.Parameter(torch.randn_like(t5.shared.weight))
    for m in t5.modules():  # a bias as large as a trained model's, so that dropping it shows
        if hasattr(m, "relative_attention_bias"):
            m.relative_attention_bias.weight.data.normal_(0, 2.0)
    return t5.double()


def _batch():
    batch = random_batch(V)
    batch["expl_attention_mask"][3, -5:] = 0  # padding in both inputs and targets
    return batch


class CountSDPA:
    """Counts calls of torch's SDPA (transformers looks it up at call time)."""

    def __init__(self, monkeypatch):
        self.calls, real = 0, torch.nn.functional.scaled_dot_product_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)


def _run(t5, attention, fn):
    t5.set_attn_implementation(attention)
    t5.zero_grad()
    out = fn(t5)
    out.backward(torch.ones_like(out) if out.dim() else None)
    return out.detach(), {n: p.grad.clone() for n, p in t5.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-10, atol=1e-12, msg=name)


def _encoder(t5):
    b = _batch()
    states = t5.encoder(input_ids=b["expl_input_ids"], attention_mask=b["expl_attention_mask"])[0]
    return states * b["expl_attention_mask"][..., None]  # real tokens only: padded rows are never read


def _decoder(t5):
    """Decoder self-attention (causal + bias) and cross-attention (the encoder's padding mask) on
    fixed encoder states, so that only the decoder's attention is compared."""
    b = _batch()
    torch.manual_seed(1)
    enc = torch.randn(*b["expl_input_ids"].shape, t5.config.d_model, dtype=torch.float64)
    return t5.decoder(input_ids=t5._shift_right(b["rationale_labels"]), encoder_hidden_states=enc,
                      encoder_attention_mask=b["expl_attention_mask"])[0]


@pytest.mark.parametrize("tied", [True, False], ids=["t5-v1.0-tied", "t5-v1.1-untied"])
@pytest.mark.parametrize("part", [_encoder, _decoder], ids=["encoder", "decoder"])
def test_sdpa_equals_eager_in_fp64(tied, part, monkeypatch):
    t5 = _t5(tied)
    eager = _run(t5, "eager", part)
    sdpa_calls = CountSDPA(monkeypatch)
    sdpa = _run(t5, "sdpa", part)
    layers = t5.config.num_layers
    assert sdpa_calls.calls == (layers if part is _encoder else 2 * layers)  # self (+ cross) per block
    _assert_same(sdpa, eager)


@pytest.mark.parametrize("tied", [True, False], ids=["t5-v1.0-tied", "t5-v1.1-untied"])
@pytest.mark.parametrize("loss", ["fused", "reference"])
def test_the_training_step_is_eager_attentions_in_fp64(tied, loss):
    """The whole loss (label and rationale passes, MI, encoder once) and every gradient."""
    t5, results = _t5(tied), {}
    for attention in ("eager", "sdpa"):
        model = DistillModel(t5, load_config(attention=attention, loss=loss, lean_layers=False))
        assert t5.config._attn_implementation == attention
        results[attention] = _run(t5, attention, lambda _: model(_batch())["total"])
    _assert_same(results["sdpa"], results["eager"])


@pytest.mark.parametrize("tied", [True, False], ids=["t5-v1.0-tied", "t5-v1.1-untied"])
def test_generation_with_the_cache_is_eager_attentions(tied, monkeypatch):
    t5, out = _t5(tied).eval(), {}
    for m in t5.modules():  # outputs that differ from row to row, so that every step is compared
        if isinstance(m, nn.Linear):
            m.weight.data.mul_(3)
    b = _batch()
    for attention in ("eager", "sdpa"):
        t5.set_attn_implementation(attention)
        calls = CountSDPA(monkeypatch)
        gen = t5.generate(input_ids=b["pred_input_ids"], attention_mask=b["pred_attention_mask"], max_new_tokens=8,
                          do_sample=False, use_cache=True, output_scores=True, return_dict_in_generate=True)
        assert (calls.calls > 0) == (attention == "sdpa")
        out[attention] = gen.sequences, torch.stack(gen.scores)
    assert torch.equal(out["sdpa"][0], out["eager"][0])
    assert len(set(map(tuple, out["eager"][0].tolist()))) > 1
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], rtol=1e-12, atol=1e-12)


def test_the_export_is_plain_t5(tmp_path):
    t5 = _t5(False)
    DistillModel(t5, load_config(attention="sdpa"))
    t5.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not any("attn" in key for key in saved)
    assert T5ForConditionalGeneration.from_pretrained(tmp_path).config.model_type == "t5"


def test_an_unknown_attention_is_refused():
    from cotmi_ds.config import UsageError

    with pytest.raises(UsageError, match=r"^--attention 'flash' is not one of: sdpa, eager$"):
        load_config(attention="flash")
