"""--compile: each T5 block compiled in place. The training step's losses and gradients are the eager
step's to rounding, a batch of new shapes reuses the compiled code, state-dict keys (hence exports)
are unchanged, generation runs eagerly, and where it cannot work it is refused with one line."""
import pytest
import torch
from torch import nn
from transformers import T5ForConditionalGeneration

from cotmi_ds.config import load_config
from cotmi_ds.model.compiled import CompileClock, compile_refusal, eager_blocks
from cotmi_ds.model.student import DistillModel
from tests.conftest import random_batch, tiny_t5_config

V = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def _t5():
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(tiny_t5_config(V))
    t5.lm_head.weight = nn.Parameter(torch.randn_like(t5.shared.weight))
    return t5.train()


def _wider(batch):
    """Two more rows and three more positions everywhere (padded): other shapes, same kind of batch."""
    out = {}
    for key, x in batch.items():
        x = torch.cat([x, x[:2]])
        fill = -100 if "labels" in key else 0
        out[key] = nn.functional.pad(x, (0, 3), value=fill)
    return out


def _step(model, batch):
    model.t5.zero_grad()
    parts = model(batch)
    parts["total"].backward()
    return ({k: v.item() for k, v in parts.items()},
            {n: p.grad.clone() for n, p in model.t5.named_parameters() if p.grad is not None})


def test_compiled_blocks_give_the_eager_step_and_reuse_their_code_for_new_shapes():
    eager_t5, compiled_t5 = _t5(), _t5()
    eager = DistillModel(eager_t5, load_config())
    compiled = DistillModel(compiled_t5, load_config(compile=True))
    assert compiled_t5.state_dict().keys() == eager_t5.state_dict().keys()  # exports unchanged
    clock = CompileClock()
    try:
        first = random_batch(V)
        for batch in (first, _wider(first)):
            (parts, grads), (ref_parts, ref_grads) = _step(compiled, batch), _step(eager, batch)
            assert parts.keys() == ref_parts.keys()
            for k in ref_parts:
                assert parts[k] == pytest.approx(ref_parts[k], rel=1e-5, abs=1e-6), k
            assert grads.keys() == ref_grads.keys()
            for name in ref_grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
            if batch is first:
                assert clock.since_report() > 0  # it did compile
            else:
                assert clock.since_report() == 0  # symbolic shapes: no recompilation
        with eager_blocks():  # generation: the blocks run uncompiled, nothing is compiled
            compiled_t5.eval().generate(input_ids=first["pred_input_ids"], max_new_tokens=3)
        assert clock.since_report() == 0
    finally:
        clock.close()


def test_refused_where_it_cannot_work(monkeypatch):
    assert "not with ZeRO-3" in compile_refusal("cpu", 3)
    assert compile_refusal("cpu", 2) is None  # this machine has a C++ compiler

    def no_compiler():
        raise RuntimeError("no compiler")
    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    why = compile_refusal("cpu", 0)
    assert why.startswith("--compile on CPUs needs a C++ compiler") and "\n" not in why
