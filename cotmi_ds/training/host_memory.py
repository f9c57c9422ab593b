"""Host memory freed in the backward, handed back to the system on CPU runs.

glibc serves a request below its mmap threshold from its heaps and keeps the memory resident
when it is freed; the threshold rises with every large block freed, up to 32 MiB. In a CPU
backward the weights' gradients (one to a few MiB each at t5-base shapes) are allocated among
the recomputed layers' temporaries, so with activation checkpointing the heap ends the backward
holding the gradients plus the freed temporaries around them: at t5-base shapes about 0.7 GiB
above the live tensors. During the backward, ``BackwardMmap`` lowers the threshold so that those
blocks get their own mappings, which go back to the system when freed; the forward keeps glibc's
heap (its temporaries are reused block after block). The price is page faults: the blocks are
mapped afresh every step (docs/benchmarks.md has both figures).
"""
from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3         # mallopt parameter (malloc.h)
GLIBC_THRESHOLD_MAX = 32 << 20  # where glibc's own threshold ends up on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


@functools.cache
def _glibc():
    """The C library when it is glibc (``mallopt`` and ``gnu_get_libc_version``), else None. The
    process's own symbols include the C library it runs on: no search for a file."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt  # noqa: B018 - glibc has both; musl and macOS do not
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


class BackwardMmap:
    """A context for the backward: blocks of at least ``mib`` MiB are mapped on their own inside
    it; on leaving, the threshold is glibc's usual maximum (setting it once turns off glibc's
    moving threshold for the process, so leaving restores the value it would have reached)."""

    def __init__(self, mib: float):
        self.bytes = int(mib * 2**20)
        self.libc = _glibc()
        if self.libc is None:
            log.warning("the C library is not glibc: --cpu_backward_mmap_mib has no effect")

    @property
    def active(self) -> bool:
        return self.libc is not None and self.bytes > 0

    def __enter__(self):
        if self.active:
            self.libc.mallopt(M_MMAP_THRESHOLD, self.bytes)
        return self

    def __exit__(self, *exc):
        if self.active:
            self.libc.mallopt(M_MMAP_THRESHOLD, GLIBC_THRESHOLD_MAX)
        return False
