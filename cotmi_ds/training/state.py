"""Everything a resumed run needs besides the engine's own state: where the data order is, what was
evaluated so far, how many micro-batches and optimizer updates were skipped, and how long it trained. Saved in each
checkpoint's metadata under "trainer"."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cotmi_ds.data.sampler import BatchOrder
from cotmi_ds.errors import UsageError


@dataclass
class TrainState:
    order: BatchOrder
    step: int = 0
    evaluations: list[dict] = field(default_factory=list)
    skipped_micro_batches: int = 0  # micro-batches whose loss was NaN/inf (their step's update was skipped)
    skipped_updates: int = 0  # optimizer steps that left the weights unchanged (NaN/inf loss or gradients)
    seconds_before: float = 0.0  # training time of earlier launches of this run
    _launched: float = field(default_factory=time.perf_counter, repr=False)

    def start_clock(self) -> None:
        """Training time counts from here (set-up and loading are not training)."""
        self._launched = time.perf_counter()

    @property
    def train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self._launched

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict(), "evaluations": self.evaluations,
                "skipped_micro_batches": self.skipped_micro_batches, "skipped_updates": self.skipped_updates,
                "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict[str, Any], step: int, where: str = "--resume") -> None:
        """``state``: checked against the checkpoint schema (checkpoint/layout.py TRAINER) when read;
        what only the data order can judge is one line naming ``where``."""
        self.step = step
        try:
            self.order.load_state_dict(state["order"])
        except ValueError as e:
            raise UsageError(f"{where}: {e}") from None
        self.evaluations = list(state["evaluations"])
        self.skipped_micro_batches = int(state["skipped_micro_batches"])
        self.skipped_updates = int(state.get("skipped_updates", 0))  # absent in older checkpoints
        self.seconds_before = float(state["train_seconds"])
