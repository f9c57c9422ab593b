"""DeepSpeed: the config (with "auto" values filled from the CLI, as the HF integration does),
the precision rules, and ``deepspeed.initialize``. Only this module and checkpoint/ import DeepSpeed.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import logging
import math
from argparse import Namespace
from collections.abc import KeysView
from dataclasses import dataclass
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

from cotmi_ds.config import FP16_REFUSAL, TrainConfig, UsageError
from cotmi_ds.distributed import DistEnv
from cotmi_ds.ds_configs import choose_ds_config, read_ds_config


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware (NVIDIA since Ampere). torch's default probe
    also counts emulation (V100, T4: bf16 correct but slow), so native support is asked for; torch
    builds without that argument get the compute-capability rule. Call it after the rank's device
    is set: the probe looks at the current device."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs with native bf16, else fp32 (bf16 is only emulated on CPUs and older
    GPUs: slower). ``device`` is this rank's device, already set."""
    gpu_bf16 = device.type == "cuda" and native_bf16(device)
    if cfg.precision == "auto":
        return "bf16" if gpu_bf16 else "fp32"
    if cfg.precision == "bf16" and device.type == "cuda" and not gpu_bf16:
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                         "(only emulated, much slower); use fp32")
    return cfg.precision


# Fewest elements in a ZeRO gradient bucket: d_model² alone (4,096 for a d_model-64 model, 590k
# for t5-base) means hundreds of bucket flushes per step. 2**23 elements: 16 MiB in bf16.
REDUCE_BUCKET_FLOOR = 2**23
GRAD_ACCUM_DTYPE = "data_types.grad_accum_dtype"


def accumulation_dtype(precision: str, grad_accum: int, stage: int) -> str:
    """The dtype DeepSpeed accumulates gradients in over micro-batches. Its bf16 paths sum them in
    bf16 unless told otherwise, which rounds every partial sum; fp32 wherever there is something to
    accumulate and DeepSpeed supports it (ZeRO 1-3; at ZeRO-0 DeepSpeed 0.19 accumulates bf16 in bf16
    only, see _check_accumulation)."""
    if precision != "bf16":
        return "fp32"
    return "fp32" if grad_accum > 1 and stage > 0 else "bf16"



def offloads_optimizer(ds: dict[str, Any]) -> bool:
    return _get(ds, "zero_optimization.offload_optimizer.device") in ("cpu", "nvme")


def uses_torch_adam(ds: dict[str, Any], device_type: str) -> bool:
    """What "torch_adam": "auto" becomes. torch's AdamW (on GPUs its fused kernel, which ships
    compiled with torch) everywhere, so that nothing is compiled at run time; except for an optimizer
    offloaded from GPUs, where DeepSpeedCPUAdam is several times faster than torch's AdamW on CPU."""
    return not (device_type == "cuda" and offloads_optimizer(ds))


def _auto_values(cfg: TrainConfig, env: DistEnv, precision: str, hidden_size: int, stage: int,
                 torch_adam: bool) -> dict[str, Any]:
    """What each "auto" becomes. Dotted paths into the DeepSpeed config."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * env.world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": False,
        "optimizer.params.lr": cfg.lr,
        "optimizer.params.betas": [cfg.adam_beta1, cfg.adam_beta2],
        "optimizer.params.eps": cfg.adam_eps,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "optimizer.params.torch_adam": torch_adam,
        GRAD_ACCUM_DTYPE: accumulation_dtype(precision, cfg.grad_accum, stage),
        "zero_optimization.reduce_bucket_size": max(hidden_size * hidden_size, REDUCE_BUCKET_FLOOR),
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": cfg.lr,
        "scheduler.params.warmup_num_steps": cfg.warmup_steps,
        "scheduler.params.total_num_steps": cfg.max_steps,
    }


# Keys the trainer must agree with: a concrete value that differs from the flag is an error.
_MUST_MATCH = {
    "train_micro_batch_size_per_gpu": "--batch_size",
    "gradient_accumulation_steps": "--grad_accum",
    "train_batch_size": "--global_batch_size (or --batch_size x --grad_accum x world size)",
    "gradient_clipping": "--grad_clip",
    "bf16.enabled": "--precision",
    "optimizer.params.lr": "--lr",
    "optimizer.params.betas": "--adam_beta1/--adam_beta2",
    "optimizer.params.eps": "--adam_eps",
    "optimizer.params.weight_decay": "--weight_decay",
}
# Set by the trainer itself (a resume on another world size loads a universal checkpoint).
_TRAINER_OWNED = {"checkpoint.load_universal": "--resume turns it on when the world size changes"}
# Switches that would let DeepSpeed apply an update computed from NaN/inf gradients (with them on,
# its optimizers check the gradient norm they compute anyway and skip such a step).
_MUST_STAY_ON = ("bf16.check_grad_overflow", "zero_optimization.compute_grad_norm")


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    else:
        yield prefix, node


def _get(tree: dict, dotted: str):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _check_accumulation(raw: dict[str, Any], where: str, cfg: TrainConfig, precision: str, stage: int) -> None:
    """bf16 at ZeRO-0 with --grad_accum > 1: DeepSpeed 0.19 sums the micro-batches' gradients in bf16
    there (an fp32 grad_accum_dtype is rejected at start-up). Refused unless the config accepts bf16
    accumulation explicitly."""
    if precision != "bf16" or stage != 0 or cfg.grad_accum == 1:
        return
    given = _get(raw, GRAD_ACCUM_DTYPE)
    if given in (None, "auto"):
        raise UsageError(f"{where}: --grad_accum {cfg.grad_accum} with bf16 at ZeRO-0: DeepSpeed accumulates "
                         "the gradients in bf16 at stage 0; use a ZeRO-1/2 config (fp32 accumulation), or set "
                         f"{GRAD_ACCUM_DTYPE} to \"bf16\" to accept it")
    if given not in ("bf16", "bfloat16", "torch.bfloat16"):
        raise UsageError(f"{where}: {GRAD_ACCUM_DTYPE} = {given!r}: DeepSpeed accumulates bf16 gradients "
                         "only in bf16 at ZeRO-0; use a ZeRO-1/2 config for fp32 accumulation")


def fill_ds_config(raw: dict[str, Any], where: str, cfg: TrainConfig, env: DistEnv,
                   precision: str, hidden_size: int, load_universal: bool = False) -> dict[str, Any]:
    try:
        stage = zero_stage(raw)
    except (TypeError, ValueError):  # DeepSpeed's parser names the bad value below
        stage = 0
    values = _auto_values(cfg, env, precision, hidden_size, stage, uses_torch_adam(raw, env.device.type))
    ds = json.loads(json.dumps(raw))
    if _get(ds, "fp16.enabled") is True:
        raise UsageError(f"{where}: fp16.enabled: {FP16_REFUSAL}")
    for key, owner in _TRAINER_OWNED.items():
        if _get(ds, key) is not None:
            raise UsageError(f"{where}: {key} is set by the trainer ({owner}); remove it")
    for key in _MUST_STAY_ON:
        if _get(ds, key) is False:
            raise UsageError(f"{where}: {key} = false would let an update computed from NaN/inf gradients "
                             "through; remove it")
    _check_accumulation(raw, where, cfg, precision, stage)
    for key, flag in _MUST_MATCH.items():
        given = _get(ds, key)
        if given is not None and given != "auto" and given != values[key]:
            raise UsageError(f"{where}: {key} = {given!r} conflicts with {flag} ({values[key]!r}); "
                             f"set it to \"auto\" or change {flag}")
    for key, value in list(_walk(ds)):
        if value == "auto":
            if key not in values:
                raise UsageError(f"{where}: {key} is \"auto\" but the trainer has no value for it; "
                                 "set it explicitly")
            _set(ds, key, values[key])
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        ds.setdefault(key, values[key])
    _set(ds, "bf16.enabled", values["bf16.enabled"])
    if precision == "bf16" and _get(ds, GRAD_ACCUM_DTYPE) is None:
        _set(ds, GRAD_ACCUM_DTYPE, values[GRAD_ACCUM_DTYPE])
    params = _get(ds, "optimizer.params")
    if isinstance(params, dict) and params.get("torch_adam") is True:
        # DeepSpeed passes it on to torch.optim.AdamW: one kernel per tensor (on CPUs too, since torch
        # 2.4), no temporaries; on CPUs ~5x faster than the per-tensor loop torch picks by default.
        params.setdefault("fused", True)
    if load_universal:
        _set(ds, "checkpoint.load_universal", True)
    validate_ds_config(ds, where)
    return ds


class _SeenKeys(dict):
    """A dict that remembers which keys were asked for: the top-level keys DeepSpeed's own config
    parser reads are the ones it knows (it ignores the others silently)."""

    def __init__(self, data: dict, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _SeenKeysView(self)


class _SeenKeysView(KeysView):
    def __contains__(self, key):
        self._mapping.seen.add(key)
        return super().__contains__(key)


def _dotted(tree: dict, loc: tuple) -> str:
    """Where a pydantic error's location (relative to one section) sits in the whole config."""
    suffix = ".".join(str(part) for part in loc)
    paths = {".".join(p.split(".")[:i]) for p, _ in _walk(tree) for i in range(1, p.count(".") + 2)}
    matches = sorted(p for p in paths if p == suffix or p.endswith("." + suffix))
    return matches[0] if matches else suffix


def validate_ds_config(ds: dict[str, Any], where: str) -> None:
    """Run DeepSpeed's own config parser on a filled config, without starting an engine, and turn
    what it rejects into one line naming the key: unknown top-level keys (which DeepSpeed would
    ignore silently), unknown or mistyped keys inside its sections (its pydantic models forbid them)."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = copy.deepcopy(ds)
    probe.pop("train_batch_size", None)  # checked against the flags above; DeepSpeed would recheck
    seen: set = set()                    # it against whatever world size this process sees
    try:
        DeepSpeedConfig(_SeenKeys(probe, seen))
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = _dotted(ds, err["loc"])
        what = "unknown key" if err["type"] == "extra_forbidden" else f"bad value {err.get('input')!r}"
        raise UsageError(f"{where}: {key}: {what} ({err['msg']})") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{where}: rejected by DeepSpeed: {reason}") from None
    known = seen | _READ_OUTSIDE_CONFIG
    unknown = [k for k in ds if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"{where}: unknown key {unknown[0]!r}{hint}; DeepSpeed "
                         f"{_deepspeed_version()} would ignore it")


# Top-level keys DeepSpeed reads outside DeepSpeedConfig's parser.
_READ_OUTSIDE_CONFIG = {"sequence_parallel_size"}


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def build_ds_config(cfg: TrainConfig, env: DistEnv, precision: str, hidden_size: int,
                    load_universal: bool = False) -> dict[str, Any]:
    raw, where = read_ds_config(choose_ds_config(cfg.ds_config, env.world_size))
    return fill_ds_config(raw, where, cfg, env, precision, hidden_size, load_universal)


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(_get(ds_config, "zero_optimization.stage") or 0)


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
