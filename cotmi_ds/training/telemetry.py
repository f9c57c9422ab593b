"""What a run reports: TensorBoard scalars (rank 0 only), the progress bar or log lines, memory,
phase timers, FLOPs and MFU.

Nothing here waits for the GPU inside a step: step values are accumulated as tensors on the device,
and the phase timers record CUDA events; both are read, and reduced over ranks, once per log
interval.
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from cotmi_ds.console import terminal_width_known
from cotmi_ds.distributed import DistEnv, all_reduce_sum
from cotmi_ds.model.flops import TFLOPS, peak_flops_per_s

PHASES = ("data_wait", "forward", "backward", "optimizer")


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * resource.getpagesize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # The kernel updates its high-water mark lazily: it can trail the current RSS a little.
    return current / 2**30, max(current, peak) / 2**30


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _hparam_value(value):
    """TensorBoard's hparams take numbers and strings (torch stores bools as 0/1: shown as text)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None or isinstance(value, (int, float, str)):
        return value
    return str(value)


class PhaseTimers:
    """Seconds per phase (``PHASES``). On GPUs a phase is the device's time between two CUDA events
    recorded on the current stream where the phase begins and ends, so its kernels count for it
    however far ahead of them the host runs; the events are read when ``seconds`` is asked for (at
    log time), which waits for the last of them. On CPUs, wall time."""

    def __init__(self, device: torch.device):
        self.events = device.type == "cuda"
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def timed(self, phase: str):
        if self.events:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._pending.append((phase, start, end))
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] += time.perf_counter() - t

    def seconds(self) -> dict[str, float]:
        """The seconds per phase since the last ``reset``."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for phase, start, end in self._pending:
                self._seconds[phase] += start.elapsed_time(end) / 1000.0
            self._pending = []
        return dict(self._seconds)

    def reset(self) -> None:
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._pending = []


class Telemetry:
    def __init__(self, run_dir: Path, env: DistEnv, *, start_step: int, max_steps: int, log_every: int,
                 config_yaml: str, hparams: dict | None = None, precision: str = "fp32"):
        self.env, self.max_steps, self.log_every = env, max_steps, log_every
        self.timers = PhaseTimers(env.device)
        self.peak_flops, peak_note = peak_flops_per_s(env.device, precision)
        self.writer = None
        self.bar = None
        self._session_end = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            # A resumed run hides the steps after its checkpoint that the interrupted run had logged.
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            self.writer.add_text("config", "```\n" + config_yaml + "\n```", start_step)
            if hparams is not None:
                self._write_hparams(hparams)
            if terminal_width_known():
                self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if self.peak_flops is None:  # said once, not at every log line
            self.print(f"telemetry: throughput/mfu_pct is not logged: {peak_note}")
        else:
            self.print(f"telemetry: MFU against {peak_note}")
        self._reset()
        self._kept_peaks = (0.0, 0.0)
        self._reset_device_peaks()
        self._t_start, self._start_step = time.perf_counter(), start_step

    def _write_hparams(self, hparams: dict) -> None:
        """The config in TensorBoard's HPARAMS tab (same event file as the scalars, so the
        metrics below are read from this run's own scalars)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        metrics = {tag: 0.0 for tag in ("eval/test/accuracy", "eval/valid/accuracy", "loss/total",
                                        "throughput/samples_per_s")}
        experiment, session_start, self._session_end = hparams_summaries(
            {k: _hparam_value(v) for k, v in hparams.items()}, metrics)
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary)

    def _reset(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._loss_weight: torch.Tensor | float = 0.0
        self._samples = self._tokens = self._flops = 0
        self._steps = 0
        self.timers.reset()
        self._t0 = time.perf_counter()

    def _device_peaks(self) -> tuple[float, float]:
        """(allocated, reserved) GiB: the device's peaks since the last reset, and those kept from
        before a pause in this interval."""
        device = self.env.device
        return (max(self._kept_peaks[0], torch.cuda.max_memory_allocated(device) / 2**30),
                max(self._kept_peaks[1], torch.cuda.max_memory_reserved(device) / 2**30))

    def _reset_device_peaks(self, kept: tuple[float, float] = (0.0, 0.0)) -> None:
        """memory/max_*_gib are the peaks of one log interval's training steps: the device's peak
        counters are reset after each logged interval and after each pause (evaluation's peaks are
        not training's); ``kept`` carries the interval's training peaks from before a pause."""
        if self.env.device.type == "cuda":
            self._kept_peaks = kept
            torch.cuda.reset_peak_memory_stats(self.env.device)

    def timed(self, phase: str):
        """The time inside goes to ``time/<phase>_ms`` (PhaseTimers)."""
        return self.timers.timed(phase)

    def record_micro_step(self, parts: dict[str, torch.Tensor], samples: int, tokens: int,
                          flops: int = 0, weight: float = 1.0, finite: torch.Tensor | None = None) -> None:
        """``weight``: the micro-batch's loss weight (sampler.py); the logged losses are the
        weighted means, i.e. the loss the optimizer stepped on. ``finite`` (a flag on the device):
        whether the loss counts; a NaN/inf one is left out of the losses (its update was skipped),
        not out of the throughput (it was computed)."""
        keep = None if finite is None else finite.float()
        for k, v in parts.items():
            v = v.detach().float() * weight
            if keep is not None:
                v = torch.where(finite, v, 0.0)
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._loss_weight = self._loss_weight + (weight if keep is None else keep * weight)
        self._samples += samples
        self._tokens += tokens
        self._flops += flops

    def end_step(self, step: int, lr: float, grad_norm: float | None,
                 skipped_micro_batches: int = 0, skipped_updates: int = 0) -> dict[str, float] | None:
        """Advance the bar; every ``log_every`` steps (and at the last) reduce and write. Returns
        the logged values on the logging steps (every rank gets them). ``skipped_micro_batches`` is the
        run's count so far of micro-batches skipped (non-finite loss), ``skipped_updates`` of
        optimizer updates skipped (non-finite gradients)."""
        self._steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every and step != self.max_steps:
            return None
        keys = sorted(self._sums)
        weight_on_device = isinstance(self._loss_weight, torch.Tensor)
        tensors = [self._sums[k] for k in keys] + ([self._loss_weight] if weight_on_device else [])
        read = torch.stack([t.reshape(()).float() for t in tensors]).tolist() if tensors else []  # the one read
        if not weight_on_device:
            read.append(float(self._loss_weight))
        phase_seconds = self.timers.seconds()
        elapsed = time.perf_counter() - self._t0
        local = (read + [phase_seconds[p] for p in PHASES]
                 + [elapsed, self._samples, self._tokens, self._flops])
        summed = all_reduce_sum(local, self.env)
        world = self.env.world_size
        loss_weight = summed[len(keys)]
        *phase_s, elapsed_sum, samples, tokens, flops = summed[len(keys) + 1:]
        elapsed = elapsed_sum / world  # every rank reports the same rates
        # every loss NaN/inf in the interval: nothing to average
        values = {f"loss/{k}": summed[i] / loss_weight if loss_weight else float("nan") for i, k in enumerate(keys)}
        values["optim/lr"] = lr
        if grad_norm is not None:
            values["optim/grad_norm"] = float(grad_norm)
        values["optim/skipped_micro_batches"] = skipped_micro_batches
        values["optim/skipped_updates"] = skipped_updates
        values["throughput/samples_per_s"] = samples / elapsed
        values["throughput/tokens_per_s"] = tokens / elapsed
        values["throughput/samples_per_s_per_device"] = values["throughput/samples_per_s"] / world
        values["throughput/tokens_per_s_per_device"] = values["throughput/tokens_per_s"] / world
        flops_per_s_per_device = flops / elapsed / world
        values["throughput/tflops_per_device"] = flops_per_s_per_device / TFLOPS
        if self.peak_flops is not None:
            values["throughput/mfu_pct"] = 100.0 * flops_per_s_per_device / self.peak_flops
        # Per optimizer step, averaged over the interval and the ranks.
        values["time/step_ms"] = 1000.0 * elapsed / self._steps
        for phase, seconds in zip(PHASES, phase_s):  # device time on GPUs (PhaseTimers)
            values[f"time/{phase}_ms"] = 1000.0 * seconds / world / self._steps
        values["memory/rss_gib"], values["memory/peak_rss_gib"] = rss_gib()
        if self.env.device.type == "cuda":
            values["memory/max_allocated_gib"], values["memory/max_reserved_gib"] = self._device_peaks()
        self._write(step, values)
        self._report(step, values)
        self._reset()
        self._reset_device_peaks()
        return values

    @contextmanager
    def paused(self):
        """Time spent inside (evaluation) is left out of the next interval's throughput, and its
        memory peak out of the interval's memory/max_*_gib."""
        t = time.perf_counter()
        peaks = self._device_peaks() if self.env.device.type == "cuda" else None
        try:
            yield
        finally:
            self._t0 += time.perf_counter() - t
            if peaks is not None:
                self._reset_device_peaks(kept=peaks)

    def log_eval(self, step: int, split: str, metrics: dict[str, float], seconds: float | None = None) -> None:
        """Every float metric (accuracy, ECE, ...) becomes the scalar ``eval/<split>/<name>``;
        ints are counts (correct, total) and only printed. One line is printed, with the time the
        split took if given."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
        self._write(step, {f"eval/{split}/{k}": v for k, v in numbers.items()})
        if "accuracy" in numbers:
            line = f"{split} accuracy {numbers['accuracy']:.4f}"
            if "correct" in metrics and "total" in metrics:
                line += f" ({metrics['correct']}/{metrics['total']})"
        else:
            line = split
        others = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if k != "accuracy")
        took = "" if seconds is None else f" in {seconds:.1f} s"
        self.print(f"step {step}: {line}{took}" + (f"; {others}" if others else ""))

    def log_eval_time(self, step: int, seconds: float) -> None:
        """``time/eval_s``: the wall time of one evaluation (every split), what evaluating costs."""
        self._write(step, {"time/eval_s": seconds})

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
        skipped = values["optim/skipped_micro_batches"] or values["optim/skipped_updates"]
        print(f"step {step}/{self.max_steps} | loss {values['loss/total']:.4f} ({parts}) | "
              f"lr {values['optim/lr']:.2e} | {sps:.1f} samples/s | "
              f"{values['throughput/tokens_per_s']:.0f} tokens/s | eta {_fmt_duration(eta)}"
              + (f" | skipped so far: {values['optim/skipped_micro_batches']:.0f} micro-batches, "
                 f"{values['optim/skipped_updates']:.0f} updates" if skipped else ""), flush=True)

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
            if self._session_end is not None:  # the HPARAMS tab shows the run as finished
                self.writer.file_writer.add_summary(self._session_end)
            self.writer.close()
