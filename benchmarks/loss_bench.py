"""`cotmi bench loss`: the fused loss against the plain reference, in one run.

Table 1, the loss alone at T5-base shapes (B = 8, T_rat = 256, T_lab = 8, V = 32,128, d = 768):
label CE + rationale CE + MI, forward and backward from hidden states and the LM-head weight
(the reference multiplies out the full logits first, as ``lm_head`` does). Table 2, a full MI training
step (forward, backward, AdamW) of a tiny T5 with the real vocabulary, built from a T5Config with random
weights, through ``DistillModel``: ``--loss reference`` (HF forward per task, full logits) against
``--loss fused`` with the encoder run once for both prefixes and, to measure what that saves, per task.

Each figure comes from its own process, so its peak memory is its own; variants alternate, ``repeats``
times, so that a busy machine slows them alike.
Time: median over the steps after the first of each process. Memory: table 1, the peak above the
level just before the first loss call (inputs allocated); table 2, the peak resident memory of the
whole process (imports, model, optimizer state included) — on GPUs the peak allocated memory.

Peak memory on CPUs: the kernel's high-water mark of resident memory (VmHWM), reset to the current
resident size right before the measured code (writing 5 to /proc/self/clear_refs, Linux >= 4.0), so
every page the code touches at once counts, whatever allocated it; on GPUs
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.options import REPO, LossOptions
from cotmi_ds.errors import UsageError
from cotmi_ds.flags import parse_flags

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = {"label_ce": 0.5, "rationale_ce": 0.5, "mi": 0.1}  # α = 0.5, β = 0.1


def parse_options(flags: dict) -> LossOptions:
    opts = parse_flags(LossOptions, flags, "cotmi bench loss")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU is visible to torch (torch.cuda.is_available() is False)")
    unknown = set(opts.parts.split(",")) - {"loss", "train"}
    if unknown or not opts.parts:
        raise UsageError(f"--parts {opts.parts!r}: a comma-separated subset of loss, train")
    return opts


def _targets(g, B, T, V, device):
    """Right-padded targets: lengths uniform in [T/2, T], the longest row full."""
    y = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    lengths[0] = T
    y[torch.arange(T)[None] >= lengths[:, None]] = -100
    return y.to(device)


# --- measuring ----------------------------------------------------------------------------------

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


def run_isolated(function: str, spec: dict, timeout_s: int = 1800) -> dict:
    """Call ``function(spec)`` of this module in a fresh interpreter; it returns a JSON-able dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, __file__, "child", function, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {function} {spec} failed:\n{proc.stderr[-3000:]}")
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


# --- child side: one variant, one process -------------------------------------------------------

def _child_setup(o: LossOptions) -> None:
    if o.threads:
        torch.set_num_threads(o.threads)


def loss_alone(spec: dict) -> dict:
    from cotmi_ds.losses.fused import fused_losses
    from cotmi_ds.losses.reference import mi_term, token_ce

    o = LossOptions(**spec["opts"])
    _child_setup(o)
    device, dtype = torch.device(o.device), DTYPES[o.dtype]
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(o.vocab, o.d_model, generator=g) * o.d_model ** -0.5).to(device, dtype).requires_grad_()
    h_lab = torch.randn(o.batch, o.label_len, o.d_model, generator=g).to(device, dtype).requires_grad_()
    h_rat = torch.randn(o.batch, o.rationale_len, o.d_model, generator=g).to(device, dtype).requires_grad_()
    y_lab, y_rat = _targets(g, o.batch, o.label_len, o.vocab, device), _targets(g, o.batch, o.rationale_len, o.vocab, device)

    def step():
        if spec["variant"] == "fused":
            parts = fused_losses(W, h_lab, y_lab, h_rat, y_rat, mi_variant=o.mi_variant, chunk_mib=o.chunk_mib)
        else:
            z_lab, z_rat = h_lab @ W.t(), h_rat @ W.t()
            parts = {"label_ce": token_ce(z_lab, y_lab), "rationale_ce": token_ce(z_rat, y_rat),
                     "mi": mi_term(o.mi_variant, z_lab, z_rat, y_lab, y_rat)}
        sum(WEIGHTS[k] * v for k, v in parts.items()).backward()
        for t in (W, h_lab, h_rat):
            t.grad = None

    mem = PeakMemory(device)
    mem.start()
    seconds = [timed(step, device) for _ in range(o.steps)]
    return {"seconds": seconds[1:], "peak_bytes": mem.above_start()}


def _tiny_t5(vocab: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab, d_model=64, d_ff=256, d_kv=16, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def train_step(spec: dict) -> dict:
    from cotmi_ds.config import load_config
    from cotmi_ds.model.student import DistillModel

    o = LossOptions(**spec["opts"])
    _child_setup(o)
    device, dtype = torch.device(o.device), DTYPES[o.dtype]
    cfg = load_config(mode="mi", loss=spec["loss"], encoder_once=spec["encoder_once"], mi_variant=o.mi_variant,
                      loss_chunk_mib=o.chunk_mib)
    model = DistillModel(_tiny_t5(o.vocab), cfg).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    B = o.batch

    def inputs():
        lengths = torch.randint(o.input_len // 2, o.input_len + 1, (B,), generator=g)
        lengths[0] = o.input_len
        mask = (torch.arange(o.input_len)[None] < lengths[:, None]).long()
        return (torch.randint(2, o.vocab, (B, o.input_len), generator=g) * mask).to(device), mask.to(device)

    batch = dict(zip(("pred_input_ids", "pred_attention_mask"), inputs()))
    batch.update(zip(("expl_input_ids", "expl_attention_mask"), inputs()))
    batch["labels"] = _targets(g, B, o.label_len, o.vocab, device)
    batch["rationale_labels"] = _targets(g, B, o.rationale_len, o.vocab, device)

    def step():
        parts = model(batch)
        parts["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    mem = PeakMemory(device)
    if device.type == "cuda":
        mem.start()  # GPU: peak allocated above the model (optimizer state is created by the first step)
    seconds = [timed(step, device) for _ in range(o.steps)]
    peak = mem.above_start() if device.type == "cuda" else peak_rss_bytes()
    return {"seconds": seconds[1:], "peak_bytes": peak}


# --- parent side ---------------------------------------------------------------------------------

def _alternate(target: str, variants: list[tuple[str, dict]], repeats: int) -> dict[str, dict]:
    """Run every variant ``repeats`` times in fresh processes, alternating the order each round."""
    seconds = {name: [] for name, _ in variants}
    peaks = {name: [] for name, _ in variants}
    for r in range(repeats):
        for name, spec in (variants if r % 2 == 0 else variants[::-1]):
            out = run_isolated(target, spec)
            seconds[name] += out["seconds"]
            peaks[name].append(out["peak_bytes"])
    return {name: {"seconds": statistics.median(seconds[name]), "peak_bytes": max(peaks[name])}
            for name in seconds}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def run(**flags) -> dict:
    o = parse_options(flags)
    opts = dataclasses.asdict(o)
    where = f"{o.dtype} on {o.device}"
    print(f"machine: {machine()}" + (f"; {o.threads} torch thread(s) per process" if o.threads else ""),
          flush=True)
    results = {}
    if "loss" in o.parts:
        print(f"\nLoss alone (label CE + rationale CE + MI '{o.mi_variant}', forward + backward), {where}: "
              f"B={o.batch}, T_rat={o.rationale_len}, T_lab={o.label_len}, V={o.vocab:,}, d={o.d_model}; "
              f"{o.repeats} alternating processes per variant, {o.steps - 1} timed steps each", flush=True)
        r = _alternate("loss_alone",
                       [(v, {"opts": opts, "variant": v}) for v in ("reference", "fused")], o.repeats)
        mem = "peak memory above baseline (MiB)"
        print(f"{'':18s}{'time/step (s)':>15s}{mem:>36s}")
        for name in ("reference", "fused"):
            print(f"{name:18s}{r[name]['seconds']:15.3f}{_mib(r[name]['peak_bytes']):>36s}")
        print(f"{'fused/reference':18s}{r['fused']['seconds'] / r['reference']['seconds']:14.2f}x"
              f"{r['fused']['peak_bytes'] / r['reference']['peak_bytes']:35.3f}x", flush=True)
        results["loss"] = r
    if "train" in o.parts:
        mem = "peak memory (MiB)" if o.device == "cuda" else "peak RSS (MiB)"
        print(f"\nMI training step (forward, backward, AdamW) of a tiny T5 (d_model 64, 2+2 layers) with "
              f"V={o.vocab:,}, {where}: B={o.batch}, inputs {o.input_len}, T_rat={o.rationale_len}, "
              f"T_lab={o.label_len}; {o.repeats} alternating processes per variant, {o.steps - 1} timed steps each",
              flush=True)
        variants = [("reference", "reference", False), ("fused", "fused", True),
                    ("fused, encoder x2", "fused", False)]
        r = _alternate("train_step",
                       [(name, {"opts": opts, "loss": loss, "encoder_once": once}) for name, loss, once in variants],
                       o.repeats)
        print(f"{'':18s}{'samples/s':>12s}{'time/step (s)':>16s}{mem:>20s}")
        for name, _, _ in variants:
            print(f"{name:18s}{o.batch / r[name]['seconds']:12.2f}{r[name]['seconds']:16.3f}"
                  f"{_mib(r[name]['peak_bytes']):>20s}")
        print(f"{'fused/reference':18s}{r['reference']['seconds'] / r['fused']['seconds']:11.2f}x{'':16s}"
              f"{r['fused']['peak_bytes'] / r['reference']['peak_bytes']:19.3f}x")
        saved = 1 - r["fused"]["seconds"] / r["fused, encoder x2"]["seconds"]
        print(f"running the encoder once for both prefixes saved {100 * saved:.1f}% of the fused step's time",
              flush=True)
        results["train"] = r
    print(f"\nmachine at the end: {machine()}")
    return results


if __name__ == "__main__":  # the child side of run_isolated
    assert sys.argv[1] == "child" and sys.argv[2] in ("loss_alone", "train_step"), sys.argv
    print(json.dumps(globals()[sys.argv[2]](json.loads(sys.argv[3]))), flush=True)
