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
import signal
from dataclasses import dataclass
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
    loop asks ``agreed()``, an all-reduce on the hosts, after the steps ``due`` names, so every rank
    stops after the same step even when only one of them received the signal. Long phases between
    steps (evaluation, the final export) ask too, before each generation batch or before starting."""

    EVERY = 2  # on several ranks, asked after every 2nd step (and after each log, evaluation and save step)

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

    @classmethod
    def due(cls, step: int, env: DistEnv, sync_step: bool) -> bool:
        """Whether the loop asks after ``step``. Alone, after every step: there is nothing to
        exchange. On several ranks the question is a round trip between the hosts (never the GPUs),
        asked every ``EVERY`` steps and at the trainer's log, evaluation and save steps: a signal
        stops the run after the step it arrived in or the one after."""
        return env.world_size == 1 or sync_step or step % cls.EVERY == 0

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


@dataclass
class SkippedUpdate:
    """An optimizer step whose update was not applied, as ``NonFiniteGuard.settle`` reports it."""
    step: int
    nonfinite_losses: list[int]  # positions of its micro-batches whose loss was NaN/inf (on some rank)
    in_a_row: int  # skipped updates in a row, this one included


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class NonFiniteGuard:
    """The promise: an update computed from a NaN/inf loss or gradient is never applied, and each one
    is counted; ``max_in_a_row`` skipped updates in a row stop the run. Kept without reading anything
    back to the host inside a step:

    - ``screen`` hands the backward the loss times (1 + 0·loss): the loss itself when it is finite,
      NaN when not, so that every gradient the backward makes is NaN and the step's optimizer
      skips the update as it skips any update with non-finite gradients (engine.py; on every rank:
      the gradients, or the check, are reduced over the ranks). The micro-batch's flag stays on the
      device.
    - ``update_done`` records each optimizer step's outcome: a bool (DeepSpeed decided on the host at
      ZeRO 1-3) or a flag on the device (ZeRO-0, optimizer_step.py).
    - ``settle`` reads what was recorded since its last call (one read, and one small host
      collective over the ranks) and returns the skipped updates in order. The trainer calls it at
      its log, evaluation and save steps and at the end, so counts, messages and the stop come at
      the next of those after the event; nothing is applied or saved in between.
    """

    def __init__(self, max_in_a_row: int, env: DistEnv):
        self.max_in_a_row, self.env = max_in_a_row, env
        self.in_a_row = 0  # skipped updates in a row, up to the last settled step
        self._losses: list[tuple[int, int, torch.Tensor]] = []  # (step, position, 1 where not finite)
        self._updates: list[tuple[int, bool | torch.Tensor]] = []

    def screen(self, loss: torch.Tensor, step: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to back-propagate, a device flag: True where ``loss`` is finite)."""
        import torch

        finite = torch.isfinite(loss.detach())
        self._losses.append((step, position, ~finite))
        return loss * (1 + 0 * loss.detach()), finite

    def update_done(self, step: int, skipped: bool | torch.Tensor) -> None:
        self._updates.append((step, skipped))

    def settle(self) -> list[SkippedUpdate]:
        import torch

        from cotmi_ds.distributed import all_reduce_sum

        flags = [flag for *_, flag in self._losses] + [flag for _, flag in self._updates]
        on_device = [f for f in flags if isinstance(f, torch.Tensor)]
        read = iter(torch.stack([f.float() for f in on_device]).tolist() if on_device else [])
        values = [next(read) if isinstance(f, torch.Tensor) else float(f) for f in flags]
        if self.env.world_size > 1:
            values = all_reduce_sum(values, self.env)
        bad_losses = [(step, position) for (step, position, _), v in zip(self._losses, values) if v > 0]
        skipped = []
        for (step, _), v in zip(self._updates, values[len(self._losses):]):
            losses = [position for s, position in bad_losses if s == step]
            if v > 0 or losses:  # a NaN loss always skips its update; counted as such in any case
                self.in_a_row += 1
                skipped.append(SkippedUpdate(step, losses, self.in_a_row))
            else:
                self.in_a_row = 0
        self._losses, self._updates = [], []
        return skipped
