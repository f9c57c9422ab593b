"""Fault-injection points. The trainer calls these hooks at fixed places and does nothing else
with them; the default does nothing. The resilience tests pass a subclass (NaN losses, a signal as
a step begins, a rank killed while saving) through ``cotmi_ds.cli.main(faults=...)``; a user's own
wrapper could hook in the same way."""
from __future__ import annotations

from typing import Any


class Faults:
    def step_begins(self, rank: int, step: int) -> None:
        """Called on every rank before step ``step`` runs."""

    def loss(self, parts: dict[str, Any], rank: int, micro_batch: int) -> dict[str, Any]:
        """May replace a micro-batch's loss parts (``micro_batch`` counts global batches drawn)."""
        return parts

    def evaluation_batch(self, rank: int, step: int, batch: int) -> None:
        """Called on every rank before each generation batch of the evaluation at ``step``
        (``batch`` counts from 0 over the splits of that evaluation)."""

    def checkpoint_written(self, rank: int, step: int) -> None:
        """Called once this rank has written its checkpoint files, before the save is published."""


NO_FAULTS = Faults()
