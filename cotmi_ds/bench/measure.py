"""How the benchmarks measure: every variant runs in a fresh Python process, so its peak memory is
its own, and variants alternate so that a busy machine slows them alike.

Peak memory: on CPUs the kernel's high-water mark of resident memory (VmHWM), reset to the current
resident size right before the measured code (writing 5 to /proc/self/clear_refs, Linux >= 4.0), so
"peak above baseline" is every page the code touched at once, whatever allocated it; on GPUs
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import time

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """``start()`` marks the baseline; ``above_start()`` is the peak since then, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
            f.write("5")
        self.base = _status_kib("VmRSS") * 1024

    def above_start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (or since the last PeakMemory.start())."""
    return _status_kib("VmHWM") * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def run_isolated(target: str, spec: dict, timeout_s: int = 1800) -> dict:
    """Call ``module:function(spec)`` in a fresh interpreter; it returns a JSON-able dict."""
    cmd = [sys.executable, "-m", "cotmi_ds.bench.measure", target, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {target} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = "load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{gpu}; {load}")


if __name__ == "__main__":  # the child side of run_isolated
    module, function = sys.argv[1].split(":")
    result = getattr(importlib.import_module(module), function)(json.loads(sys.argv[2]))
    print(json.dumps(result), flush=True)
