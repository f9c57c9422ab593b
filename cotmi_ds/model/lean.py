"""Lean layers: T5's RMSNorm and tanh-GELU as single autograd operations.

Written with tensor operators, as transformers writes them, autograd keeps every intermediate for
the backward: T5LayerNorm keeps its input twice and its normalised output (3 activations), the
``gelu_new`` of the gated feed-forward keeps 4 (x, tanh, 0.5·x, 1 + tanh). Replaced here:

- the norm by ``RMSNorm``, which keeps its input and one reciprocal RMS per row and recomputes the
  normalised activations in the backward;
- ``gelu_new`` by torch's ``gelu(approximate="tanh")`` (the same function, one fused kernel that
  keeps its input).

At t5-v1_1-base shapes this is ~30% of the activations a training step keeps (see
``benchmarks/saved_activations.py``). The functions are the same; results differ from the
operator-by-operator versions by rounding only. Instances are changed in place (class and
activation), so parameters, state-dict keys, DeepSpeed's hooks and ``save_pretrained`` exports are
untouched: an exported model is a plain T5 with its own config.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import NewGELUActivation
from transformers.models.mt5.modeling_mt5 import MT5LayerNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm


class _RMSNormFn(torch.autograd.Function):
    """y = w · (x / rms(x)) as T5 computes it: statistics in (at least) fp32, the normalised
    activations cast to a 16-bit weight's dtype before the scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = x32 * rstd
        out_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else normed.dtype
        ctx.save_for_backward(x, weight, rstd)
        ctx.out_dtype = out_dtype
        return weight * normed.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.to(rstd.dtype)
        normed = (x32 * rstd).to(ctx.out_dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(rstd.dtype)  # d loss / d normalised activations
            # d/dx of x·r with r = (mean(x²) + eps)^-1/2:  r·g − x·r³·mean(g·x)
            grad_x = (rstd * g - x32 * rstd.pow(3) * (g * x32).mean(-1, keepdim=True)).to(x.dtype)
        return grad_x, grad_w, None


class LeanT5LayerNorm(T5LayerNorm):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


class GELUTanh(nn.Module):
    """``gelu_new`` (the tanh approximation of GELU) as torch's single kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


def make_lean(model: nn.Module) -> int:
    """Switch every T5LayerNorm and ``gelu_new`` activation in ``model`` to its lean form, in place;
    returns how many modules changed."""
    changed = 0
    for module in list(model.modules()):
        if type(module) in (T5LayerNorm, MT5LayerNorm):  # mT5's is a copy of T5's
            module.__class__ = LeanT5LayerNorm
            changed += 1
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                changed += 1
    return changed
