"""--precision: what 'auto' becomes on this rank's device, and the GPUs that really compute in bf16."""
from __future__ import annotations

import torch

from cotmi_ds.config import TrainConfig
from cotmi_ds.errors import UsageError


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware (NVIDIA since Ampere). torch's default probe
    also counts emulation (V100, T4: bf16 correct but slow), so native support is asked for; torch
    builds without that argument get the compute-capability rule. Call it after the rank's device
    is set: the probe looks at the current device."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.get_device_capability(device)[0] >= 8


def precision_for(requested: str, gpu_bf16: bool) -> str:
    """'auto' -> bf16 on a GPU with native bf16, else fp32 (bf16 is only emulated on CPUs and older
    GPUs: slower); any other --precision as given."""
    if requested == "auto":
        return "bf16" if gpu_bf16 else "fp32"
    return requested


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """--precision on this rank's ``device`` (already set), refusing bf16 where it is only emulated."""
    gpu_bf16 = device.type == "cuda" and native_bf16(device)
    if cfg.precision == "bf16" and device.type == "cuda" and not gpu_bf16:
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                         "(only emulated, much slower); use fp32")
    return precision_for(cfg.precision, gpu_bf16)
