"""The DeepSpeed engine: ``deepspeed.initialize`` with the trainer's optimizer and schedule, and the
backward and step the loop calls. The config it runs comes from ds_configs/. DeepSpeed is imported
inside the functions that use it, never at a module's import, so that the CLI validates without it.
"""
from __future__ import annotations

import contextlib
import logging
from argparse import Namespace
from dataclasses import dataclass
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

from cotmi_ds.config import TrainConfig
from cotmi_ds.ds_configs import zero_stage
from cotmi_ds.training.optimizer_step import DeviceStep
from cotmi_ds.training.optimizer_step import install as install_device_step


@dataclass
class TrainEngine:
    """The DeepSpeed engine and what the rest of the trainer needs to know about it."""
    ds: Any  # deepspeed.DeepSpeedEngine
    stage: int
    world_size: int
    backward_memory: Any = contextlib.nullcontext()  # host_memory.BackwardMmap on CPUs with checkpointing
    device_step: DeviceStep | None = None  # ZeRO-0: the optimizer step on the device (optimizer_step.py)

    @property
    def zero3(self) -> bool:
        return self.stage == 3

    @property
    def synced_generation(self) -> bool:
        """ZeRO-3 partitions the weights over ranks: every rank must take part in every forward."""
        return self.zero3 and self.world_size > 1

    @property
    def t5(self):
        return self.ds.module.t5

    def backward(self, loss: torch.Tensor) -> None:
        with self.backward_memory:
            self.ds.backward(loss)

    def step(self) -> bool | torch.Tensor:
        """``engine.step()`` after a micro-batch's backward. Whether this call ended an accumulation
        window and its update was skipped because the gradients were NaN/inf (False inside a window).
        At ZeRO 1-3 DeepSpeed's optimizers check the gradient norm before applying it, reduce that
        check over the ranks, count the skip in ``skipped_steps`` and leave weights, optimizer state
        and learning-rate schedule as they were: a bool. At ZeRO-0 the check is on the device
        (optimizer_step.py; the gradients are already all-reduced): a 0-d tensor, 1.0 when skipped,
        that nobody has to read now. Every rank gets the same answer."""
        steps, skipped = self.ds.global_steps, self.ds.skipped_steps
        self.ds.step()
        if self.ds.global_steps == steps:
            return False
        if self.device_step is not None:
            return self.device_step.skipped
        return self.ds.skipped_steps != skipped


def create_engine(model: torch.nn.Module, ds_config: dict[str, Any], cfg: TrainConfig,
                  world_size: int) -> TrainEngine:
    """deepspeed.initialize with the config's optimizer (or AdamW) and, unless the config names a
    scheduler, HF's linear decay with warm-up (lr at step 0 is the peak when warmup_steps = 0, as in
    the released runs; DeepSpeed's WarmupDecayLR would start at 0)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:  # fused: compiled into torch (GPUs and CPUs), nothing built at run time
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=True)
    def linear_schedule(opt):
        return get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)

    scheduler = None if "scheduler" in ds_config else linear_schedule
    if zero_stage(ds_config) == 3:
        # A weight read outside its own module's forward (the fused loss reads the LM head's) is
        # gathered for the reading module's forward and backward only if registered with it.
        for param in getattr(model, "params_read_outside_their_module", list)():
            deepspeed.zero.register_external_parameter(model, param)
    accelerator = deepspeed.get_accelerator()
    # DeepSpeed would select the device numbered LOCAL_RANK; with one GPU bound per task that is not
    # the one init_distributed chose (the only visible one, device 0).
    args = Namespace(device_rank=accelerator.current_device()) if accelerator.device_name() == "cuda" else None
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    if world_size == 1 and zero_stage(ds_config) == 0:
        # Nothing to reduce in a world of one, but DeepSpeed's ZeRO-0 path would still flatten every
        # gradient into one buffer (an extra copy of all gradients), "all-reduce" it, divide it by
        # one and copy it back after each backward.
        engine.enable_backward_allreduce = False
    undo_priming_step(engine.optimizer)
    return TrainEngine(engine, zero_stage(ds_config), world_size, backward_memory(cfg, accelerator.device_name()),
                       device_step=install_device_step(engine, engine.gradient_clipping()))


def primes_its_optimizer(optimizer) -> bool:
    """DeepSpeed's fp16/bf16 wrappers for ZeRO-0 (runtime/fp16/fused_optimizer.py FP16_Optimizer,
    unfused_optimizer.py FP16_UnfusedOptimizer) step the optimizer once on zero gradients when they
    are built (``initialize_optimizer_states``). bf16 at ZeRO-0 gets the unfused one with any
    optimizer but DeepSpeed's own FusedAdam (engine.py ``_configure_fp16_optimizer``), so on every
    device with torch's AdamW. The ZeRO 1-3 and BF16_Optimizer paths take no such step."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer))


def undo_priming_step(optimizer) -> None:
    """That step counts for AdamW (its step count is 1 before any data, so the first real update is
    ~0.74x torch's: bias correction for step 2) and applies weight decay once to the fp32 masters.
    Its moments are zero, so forgetting the state is exact (torch creates it again at the first real
    step), and the masters come back from the bf16 weights, which that step did not touch and from
    which the masters were copied."""
    if not primes_its_optimizer(optimizer):
        return
    optimizer.optimizer.state.clear()
    optimizer.refresh_fp32_params()


def drop_priming_step(optimizer, updates_applied: int) -> bool:
    """A bf16 ZeRO-0 checkpoint saved before ``undo_priming_step`` existed counts one AdamW step more
    than the updates it applied. On resume that count is set back (True when it was), so bias
    correction goes on as in a run that never took the priming step; the one weight decay it applied
    stays in the weights (a factor 1 - lr x weight_decay, none at the default weight_decay 0)."""
    if not primes_its_optimizer(optimizer):
        return False
    states = [state for state in optimizer.optimizer.state.values() if "step" in state]
    if not states or any(int(state["step"]) != updates_applied + 1 for state in states):
        return False
    for state in states:
        state["step"] = state["step"] - 1  # a tensor (torch's AdamW) or an int (DeepSpeed's FusedAdam)
    return True


def backward_memory(cfg: TrainConfig, device_type: str):
    """The context the backward runs in: on CPUs with checkpointing, host_memory.BackwardMmap."""
    if device_type == "cpu" and cfg.gradient_checkpointing and cfg.cpu_backward_mmap_mib > 0:
        from cotmi_ds.training.host_memory import BackwardMmap

        return BackwardMmap(cfg.cpu_backward_mmap_mib)
    return contextlib.nullcontext()
