"""The DeepSpeed engine: ``deepspeed.initialize`` with the trainer's optimizer and schedule, and the
backward and step the loop calls. The config it runs comes from ds_configs/. DeepSpeed is imported
inside the functions that use it, never at a module's import, so that the CLI validates without it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from argparse import Namespace
from dataclasses import dataclass
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

from cotmi_ds.config import TrainConfig
from cotmi_ds.ds_configs import zero_stage


@dataclass
class TrainEngine:
    """The DeepSpeed engine and what the rest of the trainer needs to know about it."""
    ds: Any  # deepspeed.DeepSpeedEngine
    stage: int
    world_size: int
    backward_memory: Any = contextlib.nullcontext()  # host_memory.BackwardMmap on CPUs with checkpointing

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

    def step(self) -> bool:
        """``engine.step()`` after a micro-batch's backward. True when this call ended an accumulation
        window and DeepSpeed skipped its update because the gradients were NaN/inf: its optimizers
        check the gradient norm before applying it (ZeRO 1-3 and bf16 reduce that check over the
        ranks; at ZeRO-0 the gradients are already all-reduced), count the skip in
        ``skipped_steps`` and leave weights, optimizer state and learning-rate schedule as they
        were. Every rank gets the same answer; it costs no synchronisation of its own."""
        before = self.ds.skipped_steps
        self.ds.step()
        return self.ds.skipped_steps != before


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
    if not hasattr(engine.optimizer, "overflow"):
        skip_nonfinite_steps(engine.optimizer)
    return TrainEngine(engine, zero_stage(ds_config), world_size,
                       backward_memory(cfg, accelerator.device_name()))


def backward_memory(cfg: TrainConfig, device_type: str):
    """The context the backward runs in: on CPUs with checkpointing, host_memory.BackwardMmap."""
    if device_type == "cpu" and cfg.gradient_checkpointing and cfg.cpu_backward_mmap_mib > 0:
        from cotmi_ds.training.host_memory import BackwardMmap

        return BackwardMmap(cfg.cpu_backward_mmap_mib)
    return contextlib.nullcontext()


def skip_nonfinite_steps(optimizer: torch.optim.Optimizer) -> None:
    """ZeRO-0 in fp32 hands the engine the bare torch optimizer, which would apply NaN/inf
    gradients; DeepSpeed's own optimizer wrappers check the gradient norm first and skip. This gives
    the bare optimizer the same check: its ``step`` computes the norm, and when it is not finite sets
    ``overflow`` and returns without updating. The engine then counts a skipped step and leaves the
    schedule alone, as for its wrappers. One host read of the norm per optimizer step (after the
    engine's clipping, so it is not reported as the gradient norm)."""
    apply = optimizer.step

    @functools.wraps(apply)  # keeps the mark torch's LR scheduler put on the step it wrapped
    def step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = float(torch.stack(torch._foreach_norm(grads)).norm()) if grads else 0.0
        optimizer.overflow = not math.isfinite(norm)
        return None if optimizer.overflow else apply(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step
