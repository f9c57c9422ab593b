"""--cpu_backward_mmap_mib: on CPUs with checkpointing the backward's large blocks get their own
mappings (returned to the system when freed), the forward's do not."""
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _mapped_blocks() -> int:
    """glibc's count of blocks served by their own mmap (process-wide)."""
    from cotmi_ds.training.host_memory import _glibc

    libc = _glibc()
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblks


_KEPT = []  # every block stays allocated: a freed heap block that fits would be reused, whatever the threshold


def _maps(nbytes: int) -> bool:
    """Whether allocating a tensor of ``nbytes`` adds a mapped block."""
    import torch

    before = _mapped_blocks()
    _KEPT.append(torch.empty(nbytes, dtype=torch.uint8))
    return _mapped_blocks() - before == 1


def _observations() -> dict:
    """Run in a fresh process: glibc serves a request from a free heap block that fits before it
    considers the threshold, so a heap other tests have freed blocks into would hide what the
    threshold does."""
    import torch

    from cotmi_ds.config import load_config
    from cotmi_ds.training.engine import TrainEngine, backward_memory
    from cotmi_ds.training.host_memory import BackwardMmap

    seen = {}
    with BackwardMmap(4):
        seen["inside 6 MiB"] = _maps(6 * MiB)
        seen["inside 2 MiB"] = _maps(2 * MiB)  # below the threshold: glibc's heap
    seen["outside 6 MiB"] = _maps(6 * MiB)  # the threshold is back at glibc's 32 MiB ceiling
    seen["outside 40 MiB"] = _maps(40 * MiB)  # above it glibc maps blocks on its own, as always

    class FakeDS:
        def backward(self, loss):
            self.mapped = _maps(12 * MiB)  # what an allocation in the engine's backward gets

    for name, flags, device in (("gc cpu", {"gradient_checkpointing": True}, "cpu"),
                                ("no gc cpu", {"gradient_checkpointing": False}, "cpu"),
                                ("gc cpu, 0", {"gradient_checkpointing": True, "cpu_backward_mmap_mib": 0}, "cpu"),
                                ("gc cuda", {"gradient_checkpointing": True}, "cuda")):
        ds = FakeDS()
        TrainEngine(ds, 0, 1, backward_memory(load_config(**flags), device)).backward(torch.zeros(()))
        seen[f"engine backward, {name}"] = ds.mapped
    return seen


def test_the_backward_maps_large_blocks_on_cpus_with_checkpointing_only():
    from cotmi_ds.training.host_memory import _glibc

    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to count mapped blocks")
    out = subprocess.run([sys.executable, "-c", "import json; from tests.unit.test_host_memory import "
                          "_observations; print(json.dumps(_observations()))"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "inside 6 MiB": True, "inside 2 MiB": False, "outside 6 MiB": False, "outside 40 MiB": True,
        "engine backward, gc cpu": True, "engine backward, no gc cpu": False,
        "engine backward, gc cpu, 0": False, "engine backward, gc cuda": False}
