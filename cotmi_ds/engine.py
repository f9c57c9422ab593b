"""DeepSpeed: the config (with "auto" values filled from the CLI, as the HF integration does),
the precision rules, and ``deepspeed.initialize``. Only this module and checkpoint.py import DeepSpeed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

from .config import TrainConfig, UsageError
from .distributed import DistEnv

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
FP16_REFUSAL = ("fp16 is refused for T5 students: T5's activations overflow fp16's range, which turns "
                "the loss into inf/NaN; use bf16 (GPUs since Ampere) or fp32")


def resolve_precision(cfg: TrainConfig) -> str:
    """'auto' -> bf16 on GPUs that support it, else fp32 (bf16 is only emulated on CPUs: slower)."""
    if cfg.precision == "fp16":
        raise UsageError(f"--precision fp16: {FP16_REFUSAL}")
    on_gpu = torch.cuda.is_available()
    gpu_bf16 = on_gpu and torch.cuda.is_bf16_supported()
    if cfg.precision == "auto":
        return "bf16" if gpu_bf16 else "fp32"
    if cfg.precision == "bf16" and on_gpu and not gpu_bf16:
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name()} has no bf16; use fp32")
    return cfg.precision


def read_ds_config(spec: str) -> tuple[dict[str, Any], str]:
    """A name from ds_configs/ (e.g. 'zero3') or the path of a JSON file."""
    path = Path(spec)
    if not path.is_file():
        named = DS_CONFIG_DIR / f"{spec}.json"
        if not named.is_file():
            names = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
            raise UsageError(f"--ds_config {spec}: no such file, and not a name in {DS_CONFIG_DIR} ({names})")
        path = named
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data, str(path)


def _auto_values(cfg: TrainConfig, env: DistEnv, precision: str, hidden_size: int) -> dict[str, Any]:
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
        # DeepSpeed's fused Adam on GPUs; torch's AdamW on CPU (the CPU op is a ~2 min compile).
        "optimizer.params.torch_adam": env.device.type != "cuda",
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
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
    "train_batch_size": "--batch_size x --grad_accum x world size",
    "gradient_clipping": "--grad_clip",
    "bf16.enabled": "--precision",
    "optimizer.params.lr": "--lr",
}


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


def fill_ds_config(raw: dict[str, Any], where: str, cfg: TrainConfig, env: DistEnv,
                   precision: str, hidden_size: int) -> dict[str, Any]:
    values = _auto_values(cfg, env, precision, hidden_size)
    ds = json.loads(json.dumps(raw))
    if _get(ds, "fp16.enabled") is True:
        raise UsageError(f"{where}: fp16.enabled: {FP16_REFUSAL}")
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
    return ds


def build_ds_config(cfg: TrainConfig, env: DistEnv, precision: str, hidden_size: int) -> dict[str, Any]:
    raw, where = read_ds_config(cfg.ds_config)
    return fill_ds_config(raw, where, cfg, env, precision, hidden_size)


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(_get(ds_config, "zero_optimization.stage") or 0)


def create_engine(model: torch.nn.Module, ds_config: dict[str, Any], cfg: TrainConfig):
    """deepspeed.initialize with the config's optimizer (or AdamW) and, unless the config names a
    scheduler, HF's linear decay with warm-up (lr at step 0 is the peak when warmup_steps = 0, as in
    the released runs; DeepSpeed's WarmupDecayLR would start at 0)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = None
    if "scheduler" not in ds_config:
        def scheduler(opt):
            return get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    if zero_stage(ds_config) == 3:
        # A weight read outside its own module's forward (the fused loss reads the LM head's) is
        # gathered for the reading module's forward and backward only if registered with it.
        for param in getattr(model, "params_read_outside_their_module", list)():
            deepspeed.zero.register_external_parameter(model, param)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    return engine
