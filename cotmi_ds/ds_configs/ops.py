"""Which compiled DeepSpeed ops a DeepSpeed config needs, and whether each is prebuilt (installed
with DeepSpeed, or left by an earlier run's build) or can be built here. The default path needs none:
torch's AdamW (fused on GPUs) ships compiled with torch. A config that offloads the optimizer from
GPUs uses DeepSpeedCPUAdam (op cpu_adam); one that sets "torch_adam": false uses FusedAdam
(fused_adam). DeepSpeed from the package registry builds these just in time on first use, which
needs a compiler on every node and costs minutes per job; checked before start-up instead.
"""
from __future__ import annotations

import glob
import os
import shutil
import sysconfig
from dataclasses import dataclass
from typing import Any, Callable

from cotmi_ds.ds_configs.fill import offloads_optimizer, uses_torch_adam
from cotmi_ds.errors import UsageError

# op -> (what uses it, the DS_BUILD_* variable that prebuilds it)
OPS = {
    "cpu_adam": ("DeepSpeedCPUAdam, the optimizer of ZeRO-Offload", "DS_BUILD_CPU_ADAM"),
    "fused_adam": ("DeepSpeed's FusedAdam (the config sets \"torch_adam\": false)", "DS_BUILD_FUSED_ADAM"),
}


def ops_needed(ds: dict[str, Any], device_type: str) -> list[str]:
    """The compiled ops DeepSpeed will load for this config (raw or filled) on this device type."""
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        return []  # no optimizer section: the trainer's own torch AdamW
    torch_adam = (opt.get("params") or {}).get("torch_adam", False)  # DeepSpeed's default: False
    if torch_adam == "auto":
        torch_adam = uses_torch_adam(ds, device_type)
    if torch_adam:
        return []
    return ["cpu_adam" if offloads_optimizer(ds) else "fused_adam"]


@dataclass
class OpProbe:
    """How ops are looked up; tests substitute fakes."""
    prebuilt: Callable[[str], bool]
    missing_tools: Callable[[str, str], list[str]]  # (op, device type) -> what a build would lack


def _prebuilt(op: str) -> bool:
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    if installed_ops.get(op, False):
        return True
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return bool(glob.glob(os.path.join(root, "*", op, f"{op}*.so")))  # an earlier just-in-time build


def _missing_tools(op: str, device_type: str) -> list[str]:
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    missing = []
    if not shutil.which(os.environ.get("CXX", "c++")):
        missing.append("a C++ compiler (c++)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        missing.append("the Python headers (python3-dev)")
    if op == "fused_adam" and device_type == "cuda" and not (CUDA_HOME and os.path.isfile(
            os.path.join(CUDA_HOME, "bin", "nvcc"))):
        missing.append("nvcc (the CUDA toolkit; set CUDA_HOME)")
    return missing


REAL_PROBE = OpProbe(_prebuilt, _missing_tools)


def prebuild_command(ops: list[str]) -> str:
    from importlib.metadata import version

    flags = " ".join(f"{OPS[op][1]}=1" for op in ops)
    return (f"{flags} pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps "
            f"deepspeed=={version('deepspeed')}")


def op_problem(op: str, device_type: str, where: str, probe: OpProbe = REAL_PROBE) -> tuple[bool, str | None]:
    """(fatal, message): nothing when OP is prebuilt; a warning when it will be built at start-up; an
    error when it cannot be built here. One line: what needs it and the command that prebuilds it."""
    if probe.prebuilt(op):
        return False, None
    what = OPS[op][0]
    missing = probe.missing_tools(op, device_type)
    if missing:
        return True, (f"{where}: needs DeepSpeed's {op} op ({what}), which is not prebuilt and cannot be "
                      f"built here (missing {', '.join(missing)}); prebuild it where a compiler is: "
                      f"{prebuild_command([op])}")
    return False, (f"{where}: DeepSpeed's {op} op ({what}) is not prebuilt: it is compiled at start-up, "
                   f"on every node (minutes); prebuild it once: {prebuild_command([op])}")


def check_ops(ds: dict[str, Any], where: str, device_type: str, probe: OpProbe = REAL_PROBE) -> list[str]:
    """Before start-up: an op that cannot be built here ends the run (UsageError); the warnings about
    ops that will be built at start-up are returned."""
    warnings = []
    for op in ops_needed(ds, device_type):
        fatal, message = op_problem(op, device_type, where, probe)
        if fatal:
            raise UsageError(message)
        if message:
            warnings.append(message)
    return warnings
