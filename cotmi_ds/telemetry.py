"""What a run reports: TensorBoard scalars (rank 0 only), the progress bar or log lines, memory.

Step values are accumulated as tensors and reduced over ranks once per log interval, so logging
adds no per-step host sync.
"""
from __future__ import annotations

import resource
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from .distributed import DistEnv, all_reduce_sum


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * resource.getpagesize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return current / 2**30, peak / 2**30


def quiet_libraries(env: DistEnv) -> None:
    """Libraries' own bars and warnings: only rank 0 speaks, and only bars a person will watch."""
    import datasets
    import transformers

    # torch's deprecation notices for the collectives DeepSpeed calls: dozens per rank and step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not (env.is_main and sys.stderr.isatty()):
        datasets.disable_progress_bars()


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Telemetry:
    def __init__(self, run_dir: Path, env: DistEnv, *, start_step: int, max_steps: int, log_every: int,
                 config_yaml: str):
        self.env, self.max_steps, self.log_every = env, max_steps, log_every
        self.writer = None
        self.bar = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            # A resumed run hides the steps after its checkpoint that the interrupted run had logged.
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            self.writer.add_text("config", "```\n" + config_yaml + "\n```", start_step)
            if sys.stderr.isatty():
                self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._reset()
        self._t_start, self._start_step = time.perf_counter(), start_step

    def _reset(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._micro = self._samples = self._tokens = 0
        self._t0 = time.perf_counter()

    def record_micro_step(self, parts: dict[str, torch.Tensor], samples: int, tokens: int) -> None:
        for k, v in parts.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._micro += 1
        self._samples += samples
        self._tokens += tokens

    def end_step(self, step: int, lr: float, grad_norm: float | None) -> dict[str, float] | None:
        """Advance the bar; every ``log_every`` steps (and at the last) reduce and write. Returns
        the logged values on the logging steps (every rank gets them)."""
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every and step != self.max_steps:
            return None
        keys = sorted(self._sums)
        local = [self._sums[k].item() for k in keys] + [self._micro, self._samples, self._tokens]
        summed = all_reduce_sum(local, self.env)
        micro = summed[len(keys)]
        elapsed = time.perf_counter() - self._t0
        values = {f"loss/{k}": summed[i] / micro for i, k in enumerate(keys)}
        values["optim/lr"] = lr
        if grad_norm is not None:
            values["optim/grad_norm"] = float(grad_norm)
        values["throughput/samples_per_s"] = summed[-2] / elapsed
        values["throughput/tokens_per_s"] = summed[-1] / elapsed
        values["throughput/samples_per_s_per_device"] = values["throughput/samples_per_s"] / self.env.world_size
        values["throughput/tokens_per_s_per_device"] = values["throughput/tokens_per_s"] / self.env.world_size
        values["memory/rss_gib"], values["memory/peak_rss_gib"] = rss_gib()
        if torch.cuda.is_available():
            values["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            values["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        self._write(step, values)
        self._report(step, values)
        self._reset()
        return values

    @contextmanager
    def paused(self):
        """Time spent inside (evaluation) is left out of the next interval's throughput."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._t0 += time.perf_counter() - t

    def log_eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self._write(step, {f"eval/{split}/{k}": v for k, v in metrics.items() if k == "accuracy"})
        self.print(f"step {step}: {split} accuracy {metrics['accuracy']:.4f} "
                   f"({metrics['correct']}/{metrics['total']})")

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(step, values)

    def _write(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def _report(self, step: int, values: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        sps = values["throughput/samples_per_s"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss/total']:.4f}", samples_s=f"{sps:.1f}", refresh=False)
            return
        done = step - self._start_step
        eta = (time.perf_counter() - self._t_start) / max(done, 1) * (self.max_steps - step)
        parts = ", ".join(f"{k[5:]} {v:.4f}" for k, v in values.items()
                          if k.startswith("loss/") and k != "loss/total")
        print(f"step {step}/{self.max_steps} | loss {values['loss/total']:.4f} ({parts}) | "
              f"lr {values['optim/lr']:.2e} | {sps:.1f} samples/s | "
              f"{values['throughput/tokens_per_s']:.0f} tokens/s | eta {_fmt_duration(eta)}", flush=True)

    def print(self, msg: str) -> None:
        if not self.env.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
