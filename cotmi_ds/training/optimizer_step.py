"""The optimizer step at ZeRO-0, on the device: the gradient norm, clipping, the NaN/inf check and
AdamW's update are kernels queued behind the backward, and nothing is read back to the host.

At ZeRO-0 DeepSpeed 0.19 hands the step to the bare torch optimizer (fp32) or to its
FP16_UnfusedOptimizer (bf16: engine.py ``_configure_fp16_optimizer`` picks it for any optimizer but
its own FusedAdam). Both would wait on the host every step:
- fp32: ``_take_model_step`` clips with runtime/utils.py ``clip_grad_norm_``, which makes two
  tensors from Python numbers on the device (each a blocking copy, c10/cuda/CUDAFunctions.h
  ``memcpy_and_sync``), and the bare optimizer would apply NaN/inf gradients;
- bf16: ``FP16_UnfusedOptimizer.step`` checks each gradient for NaN/inf with one host read per
  tensor (runtime/utils.py ``CheckOverflow.has_overflow_serial``), reads the norm back
  (``get_weight_norm``: ``float()`` and ``.item()``) and clips on the host.

Here a step whose gradient norm is not finite is skipped by torch's fused AdamW itself: given
``found_inf``, the flag torch's GradScaler hands fused optimizers (torch/optim/adam.py
``_fused_adam``), it leaves weights, moments and step count as they were. The host learns of it
later (``skipped``, read by the trainer at its next log, evaluation or save step), so DeepSpeed,
which steps the learning-rate schedule on the host, counts that step in the schedule. With a
non-fused AdamW (a DeepSpeed config with ``"fused": false``) the check is one host read of the norm
per step instead. The checkpoint format stays DeepSpeed's: only the step function is replaced.
"""
from __future__ import annotations

import functools
import math

import torch


class DeviceStep:
    """Installed by ``install``; ``skipped`` is the last update's flag: a 0-d float tensor on the
    device (1.0: skipped), or a bool where the check was a host read."""

    def __init__(self, wrapper, inner: torch.optim.Optimizer, weights: list, masters: list, clip: float):
        self.wrapper, self.inner, self.clip = wrapper, inner, clip
        self.weights, self.masters = weights, masters  # the same list in fp32; bf16 weights, fp32 masters
        self.fused = all(group.get("fused") for group in inner.param_groups)
        self.skipped: torch.Tensor | bool = False
        self._apply = inner.step

    @torch.no_grad()
    def __call__(self, closure=None):
        bf16 = self.masters is not self.weights
        if bf16:  # the masters take the bf16 gradients (a zero one where a weight had none, as DeepSpeed does)
            for w, m in zip(self.weights, self.masters):
                m.grad = torch.zeros_like(m) if w.grad is None else w.grad.float()
        grads = [m.grad for m in self.masters if m.grad is not None]
        if not grads:
            self.skipped = False
            return None
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.masters, self.clip, norm, foreach=True)
        if self.fused:
            found_inf = (~torch.isfinite(norm)).float()
            self.inner.found_inf = found_inf
            try:
                self._apply()
            finally:
                del self.inner.found_inf
            self.skipped = found_inf
        else:
            self.skipped = not math.isfinite(float(norm))
            if not self.skipped:
                self._apply()
        if bf16:
            for m in self.masters:
                m.grad = None
            torch._foreach_copy_(self.weights, self.masters)  # the forward's bf16 weights: the masters rounded
        self.wrapper._global_grad_norm = norm  # what DeepSpeed's get_global_grad_norm() then returns
        return None


def install(engine, clip: float) -> DeviceStep | None:
    """Replace the ZeRO-0 step (see the module docstring) on a built DeepSpeed engine; None where
    DeepSpeed's own optimizers step (ZeRO 1-3, and its FP16_Optimizer around its FusedAdam)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if engine.zero_optimization():
        return None
    wrapper = engine.optimizer
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        if wrapper.loss_scale_config.use_grad_scaling:  # fp16 (refused by the trainer): keep DeepSpeed's
            return None
        step = DeviceStep(wrapper, wrapper.optimizer, [p for g in wrapper.fp16_groups for p in g],
                          [m for g in wrapper.fp32_groups for m in g], clip)
    elif type(wrapper).__module__.startswith("torch.optim"):
        params = [p for group in wrapper.param_groups for p in group["params"]]
        step = DeviceStep(wrapper, wrapper, params, params, clip)
        engine.clip_fp32_gradients = lambda: None  # clipped in the step, on the device
    else:
        return None
    wrapper.overflow = False  # the engine's own skip count and schedule hold only when this is True

    @functools.wraps(wrapper.step)  # keeps the mark torch's LR scheduler put on the step it wrapped
    def run(closure=None):
        wrapper._opt_called = True  # what the scheduler's wrapper records (torch/optim/lr_scheduler.py)
        return step(closure)

    wrapper.step = run
    return step
