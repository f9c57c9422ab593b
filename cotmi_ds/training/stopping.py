"""Why a run stops before max_steps, and the exit code each reason gets.

Exit codes (of every rank; a job script or Slurm requeue logic can rely on them):

    0   completed (max_steps reached, evaluated, exported)
    2   bad input (a flag, file or checkpoint): one line on stderr, nothing written; or the disk (or
        quota) ran out during the run: one line naming it and the last good checkpoint
    3   too many consecutive non-finite losses or skipped optimizer updates (--max_bad_steps), or
        weights that became non-finite (never saved); the last good checkpoint is kept
    75  stopped by SIGTERM or SIGUSR1 (e.g. Slurm before preemption or the time limit): the current
        step was finished and a checkpoint saved; rerun the same command with --resume auto
        (75 is EX_TEMPFAIL in sysexits.h: "temporary failure, retry")

Anything else is a crash (a Python traceback, or a launcher reporting a killed rank). Launchers wrap
these codes: torchrun exits 1 when any rank exits non-zero; the deepspeed launcher passes a rank's
code on. ``<run>/status.json`` records the outcome as well.
"""
from __future__ import annotations

import atexit
import math
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept light: the CLI imports this module before torch is needed
    import torch

    from cotmi_ds.distributed import DistEnv

EXIT_NO_SPACE = 2  # the code of bad input: the user has to act before running again
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(Exception):
    """The run ended early on purpose; the CLI prints the message and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int, show: bool = True):
        super().__init__(message)
        self.exit_code, self.show = exit_code, show


class PhaseAbandoned(Exception):
    """A long phase (an evaluation, ...) stopped early because the ranks agreed to stop; the trainer
    saves and exits 75, and the phase is run again after the resume."""


class StopRequest:
    """SIGTERM/SIGUSR1 only set a flag (a handler must not interrupt a collective or a save); the
    loop asks ``agreed()`` once per step, an all-reduce, so every rank stops after the same step
    even when only one of them received the signal. Long phases between steps (evaluation, the
    final export) ask too, before each generation batch or before starting."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)  # a system call it lands in (a write, a socket) restarts
        # The interpreter's exit puts back the default handlers (death by the signal) for the second
        # or so its teardown takes: a signal then would turn exit 75 into 143. Ignored from then on.
        atexit.unregister(_ignore_stop_signals)
        atexit.register(_ignore_stop_signals)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def received(self) -> bool:
        """This rank got a signal (no collective: what a long computation checks between its parts)."""
        return self.signal_name is not None

    def agreed(self, env: DistEnv) -> bool:
        from cotmi_ds.distributed import all_reduce_sum

        return all_reduce_sum([1.0 if self.signal_name else 0.0], env)[0] > 0

    def abandon_if_agreed(self, env: DistEnv, phase: str) -> None:
        """For the points inside a long phase where every rank checks in together."""
        if self.agreed(env):
            raise PhaseAbandoned(phase)


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class NonFiniteGuard:
    """A micro-batch whose loss is NaN/inf on any rank is skipped by every rank (no backward, so no
    gradient and no optimizer or scheduler update; DeepSpeed's step counters never see it) and the
    next micro-batch takes its place. An optimizer update can also be skipped after the backward
    (DeepSpeed skips one whose gradients are not finite); ``update_done`` counts those, whatever
    skipped them. ``max_in_a_row`` consecutive skips of either kind stop the run."""

    def __init__(self, max_in_a_row: int, env: DistEnv):
        self.max_in_a_row, self.env = max_in_a_row, env
        self.in_a_row = 0  # micro-batches
        self.updates_in_a_row = 0

    def update_done(self, skipped: bool) -> None:
        """After each optimizer step: whether its update was skipped (the same on every rank)."""
        self.updates_in_a_row = self.updates_in_a_row + 1 if skipped else 0

    def all_finite(self, loss: torch.Tensor) -> bool:
        from cotmi_ds.distributed import all_reduce_sum

        bad = 0.0 if math.isfinite(loss.detach().float().item()) else 1.0
        if all_reduce_sum([bad], self.env)[0] == 0:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    @property
    def updates_exhausted(self) -> bool:
        return self.updates_in_a_row >= self.max_in_a_row
