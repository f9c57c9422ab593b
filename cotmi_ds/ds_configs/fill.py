"""A DeepSpeed config filled from the flags, as the Hugging Face integration does: every "auto"
becomes the trainer's value, a concrete value that contradicts a flag is an error, and the few keys
the trainer owns or needs left on are guarded. Standard library only; the filled config is then
checked by DeepSpeed's own parser (validate.py)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from cotmi_ds.config import FP16_REFUSAL, TrainConfig
from cotmi_ds.ds_configs import zero_stage
from cotmi_ds.errors import UsageError

if TYPE_CHECKING:
    from cotmi_ds.distributed import DistEnv


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


def walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
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
    """A copy of ``raw`` (read from ``where``) with every "auto" replaced, or a UsageError naming the key."""
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
    for key, value in list(walk(ds)):
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
    return ds
