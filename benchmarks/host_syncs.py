"""Where the host waits for the device: counted per step and by the code that asked.

Kernels run asynchronously: the host queues a step and goes on to the next while the GPU works, as
long as nothing makes it wait. What does: reading a value the device computed (``.item()``,
``bool()``, ``float()``, ``.tolist()``, ``.cpu()``), ops whose output size depends on the data
(``nonzero``, boolean masks), copies from pageable host memory (``torch.tensor(..., device=...)``,
``.to(device)`` without pinned memory) and explicit synchronisation.

- On GPUs torch flags these itself: ``torch.cuda.set_sync_debug_mode("warn")`` turns each into a
  warning at the Python line that caused it (c10/cuda/CUDAFunctions.h ``warn_or_error_on_sync``).
  It does not see waits on CUDA events, nor the staging of a non-blocking copy from pageable memory.
- On CPUs nothing waits; the same calls are counted where they would wait on a GPU: the reads of a
  value above, ``nonzero``/``masked_select``, and tensors made from host data with a ``device``
  (through a torch function mode, so inside DeepSpeed and torch too). Copies with ``.to`` are not
  counted there (on a CPU they are not copies), nor the reads in ``HOST_SIDE`` modules, whose
  tensors stay on the host on a GPU too.
"""
from __future__ import annotations

import collections
import sys
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

TORCH_DIR = str(Path(torch.__file__).resolve().parent)
SYNC_WARNING = "called a synchronizing CUDA operation"
_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero",
          "masked_select"}
_FROM_HOST = {"tensor", "as_tensor"}
# The batch before its copy to the device (collation, token counts), the data order, and numbers
# summed over the ranks on the hosts.
HOST_SIDE = ("cotmi_ds/data/collate.py", "cotmi_ds/data/sampler.py", "cotmi_ds/distributed.py")


def _short(filename: str) -> str:
    """deepspeed/runtime/engine.py, cotmi_ds/training/loop.py, ..."""
    for marker in ("site-packages/", "/cotmi_ds/", "/benchmarks/", "/tests/"):
        if marker in filename:
            rest = filename.rsplit(marker, 1)[1]
            return rest if marker == "site-packages/" else marker.strip("/") + "/" + rest
    return filename


def _caller() -> str:
    """The innermost frame outside torch and this file: who asked."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith((TORCH_DIR, __file__)):
        frame = frame.f_back
    return "?" if frame is None else f"{_short(frame.f_code.co_filename)}:{frame.f_code.co_name}"


class _CpuReads(TorchFunctionMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS or (name in _FROM_HOST and kwargs.get("device") is not None):
            where = _caller()
            if not where.startswith(HOST_SIDE):
                self.record(where)
        return func(*args, **kwargs)


class HostSyncs:
    """``with HostSyncs(device) as syncs:`` counts the waits inside, in the bucket named by the last
    ``syncs.at(label)`` (e.g. the step). ``counts[label]`` is a Counter of where they came from
    (file:function on CPUs, file:line on GPUs)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.counts: dict[object, collections.Counter] = collections.defaultdict(collections.Counter)
        self.label: object = None
        self._warnings = None
        self._mode = None

    def at(self, label) -> None:
        self._drain()
        self.label = label

    def total(self, label) -> int:
        self._drain()
        return sum(self.counts[label].values())

    def _record(self, where: str) -> None:
        self.counts[self.label][where] += 1

    def _drain(self) -> None:
        if self._warnings is None:
            return
        for w in self._warnings:
            if SYNC_WARNING in str(w.message):
                self._record(f"{_short(w.filename)}:{w.lineno}")
        self._warnings.clear()

    def __enter__(self) -> HostSyncs:
        if self.cuda:
            self._catch = warnings.catch_warnings(record=True)
            self._warnings = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._mode = _CpuReads(self._record)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._drain()
            self._catch.__exit__(*exc)
            self._warnings = None
        else:
            self._mode.__exit__(*exc)


# --- the trainer's steps, counted: the GPU check's host_syncs stage ------------------------------

def trainer_steps(flags: dict, device: torch.device) -> dict[int, collections.Counter]:
    """`cotmi train` with ``flags`` in this process, the waits of each step counted (a step's count
    runs from its start to the next one's: the step, its log line, evaluation and save)."""
    from cotmi_ds.config import load_config
    from cotmi_ds.training.faults import Faults
    from cotmi_ds.training.loop import Trainer

    class StepLabels(Faults):
        def step_begins(self, rank: int, step: int) -> None:
            syncs.at(step)

    cfg = load_config(None, **flags)
    syncs = HostSyncs(device)
    with syncs:
        Trainer(cfg, StepLabels()).train()
    return {step: syncs.counts[step] for step in range(1, cfg.max_steps + 1)}


def main(argv: list[str] | None = None) -> int:
    """python benchmarks/host_syncs.py [--flag value ...]: `cotmi train` flags (a short run; add
    --log_every N so that some steps are not log steps). Prints each step's waits by origin; exits 1
    if the trainer's own code (cotmi_ds/) waited in a step that is not a log, evaluation or save step."""
    args = list(sys.argv[1:] if argv is None else argv)
    flags = {k.removeprefix("--"): v for k, v in zip(args[::2], args[1::2])}
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    per_step = trainer_steps(flags, device)
    log_every = int(flags.get("log_every", 25))
    max_steps, save_every = max(per_step), int(flags.get("save_every", 500))
    bad = []
    for step, counts in per_step.items():
        sync_step = step % log_every == 0 or step == max_steps or (save_every and step % save_every == 0)
        mine = sum(n for where, n in counts.items() if where.startswith("cotmi_ds/"))
        if mine and not sync_step:
            bad.append(step)
        print(f"step {step}{' (log/save)' if sync_step else ''}: {sum(counts.values())} host waits"
              + "".join(f"; {where} x{n}" for where, n in counts.most_common()), flush=True)
    print(("the trainer's own code waited inside steps " + ", ".join(map(str, bad))) if bad else
          "the trainer's own code waits only at log, evaluation and save steps", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
