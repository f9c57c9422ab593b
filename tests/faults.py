"""`python -m tests.faults ARGS` is `cotmi ARGS` with faults injected, for the resilience tests.
The faults are described by environment variables (so they reach every rank a launcher starts):

    COTMI_FAULT_NAN=R:4,6-9          rank R's loss is NaN for global micro-batches 4 and 6..9
    COTMI_FAULT_NAN_GRAD=R:4         rank R's loss stays finite but its gradient is NaN for micro-batch 4
    COTMI_FAULT_SIGNAL=R:S:SIGTERM   rank R sends itself the signal as step S begins
    COTMI_FAULT_EVAL_SIGNAL=R:S:B:SIGTERM  rank R sends itself the signal before generation batch B of
                                     the evaluation at step S (B counts from 0 over its splits)
    COTMI_FAULT_KILL_IN_SAVE=R:S     rank R SIGKILLs itself in the middle of saving step S's checkpoint
                                     (after writing its files, before the others know it finished)
    COTMI_FAULT_NO_SPACE=R:S         rank R's disk is full once it has written its files of step S's checkpoint
    COTMI_FAULT_REPORT_ENV=1         not a fault: each rank first prints its rank, world size, host and
                                     CUDA_VISIBLE_DEVICES (what a launcher gave it)
    COTMI_FAULT_HOLD=R:S:SIG:PATH    rank R, as step S begins, creates PATH (the acknowledgement a test
                                     waits for) and holds the step until it has received signal SIG:
                                     a signal sent from outside then lands at a known step, however fast
                                     or slow the machine is

The package itself never reads these: the trainer receives a ``Faults`` object from ``cli.main``.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import torch

from cotmi_ds.training.faults import Faults

# Launched ranks run this module by path (`-m tests.faults`): the checkout must be importable.
PREFIX = "COTMI_FAULT_"


def _spec(name: str) -> list[str] | None:
    value = os.environ.get(PREFIX + name)
    return value.split(":") if value else None


def _ranges(text: str) -> frozenset[int]:
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


class EnvFaults(Faults):
    def __init__(self):
        nan = _spec("NAN")
        self.nan_rank, self.nan_batches = (int(nan[0]), _ranges(nan[1])) if nan else (None, frozenset())
        grad = _spec("NAN_GRAD")
        self.grad_rank, self.grad_batches = (int(grad[0]), _ranges(grad[1])) if grad else (None, frozenset())
        self.signal = _spec("SIGNAL")
        self.eval_signal = _spec("EVAL_SIGNAL")
        self.kill_in_save = _spec("KILL_IN_SAVE")
        self.no_space = _spec("NO_SPACE")
        hold = os.environ.get(PREFIX + "HOLD")
        self.hold = hold.split(":", 3) if hold else None

    def step_begins(self, rank: int, step: int) -> None:
        if self.signal and int(self.signal[0]) == rank and int(self.signal[1]) == step:
            os.kill(os.getpid(), getattr(signal, self.signal[2]))
        if self.hold and int(self.hold[0]) == rank and int(self.hold[1]) == step:
            self._hold(getattr(signal, self.hold[2]), Path(self.hold[3]))

    @staticmethod
    def _hold(sig: signal.Signals, ack: Path) -> None:
        """Wait for ``sig`` (passed on to the trainer's own handler), having said so in ``ack``."""
        received, trainer_handler = threading.Event(), signal.getsignal(sig)

        def handler(signum, frame):
            received.set()
            if callable(trainer_handler):
                trainer_handler(signum, frame)

        signal.signal(sig, handler)
        ack.write_text(f"holding for {sig.name}\n")
        while not received.wait(0.1):  # short waits: the handler runs between them
            pass
        signal.signal(sig, trainer_handler)
        signal.siginterrupt(sig, False)  # as the trainer installed it

    def evaluation_batch(self, rank: int, step: int, batch: int) -> None:
        spec = self.eval_signal
        if spec and (int(spec[0]), int(spec[1]), int(spec[2])) == (rank, step, batch):
            os.kill(os.getpid(), getattr(signal, spec[3]))

    def loss(self, parts: dict, rank: int, micro_batch: int) -> dict:
        if rank == self.nan_rank and micro_batch in self.nan_batches:
            parts = dict(parts, total=parts["total"] * float("nan"))
        if rank == self.grad_rank and micro_batch in self.grad_batches:  # sqrt'(0) · 0 = NaN; the value adds 0
            total = parts["total"]
            parts = dict(parts, total=total + torch.sqrt(total * 0))
        return parts

    def checkpoint_written(self, rank: int, step: int) -> None:
        if self.kill_in_save and int(self.kill_in_save[0]) == rank and int(self.kill_in_save[1]) == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.no_space and int(self.no_space[0]) == rank and int(self.no_space[1]) == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if __name__ == "__main__":
    from cotmi_ds.cli import main

    if os.environ.get(PREFIX + "REPORT_ENV") == "1":
        import socket
        import sys

        # One write with its newline: ranks on a node share torchrun's stdout, and under
        # PYTHONUNBUFFERED print() writes the text and the newline apart, so two lines could merge.
        sys.stdout.write(f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} on {socket.gethostname()}: "
                         f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}\n")
        sys.stdout.flush()

    main(faults=EnvFaults())
