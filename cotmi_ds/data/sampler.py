"""A deterministic, resumable order of micro-batches for one rank.

Epoch e is a permutation drawn from (seed, e); each global batch is ``world_size * batch_size``
consecutive indices of it and this rank takes its own slice. The remainder of an epoch that does not
fill a global batch is skipped (and counted in ``dropped_per_epoch``), so every rank sees the same
number of batches and no example appears twice in an epoch. The position is two integers, so a
resumed run continues from the exact batch where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchOrder:
    num_examples: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int = 0
    batch_in_epoch: int = 0

    def __post_init__(self):
        self.batches_per_epoch = self.num_examples // (self.batch_size * self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training split has {self.num_examples} examples, fewer than one global batch "
                f"({self.world_size} ranks x batch_size {self.batch_size}); lower --batch_size")
        self.dropped_per_epoch = self.num_examples - self.batches_per_epoch * self.batch_size * self.world_size
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(self.num_examples, generator=g)
        return self._perm

    def next_indices(self) -> list[int]:
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._perm = self.epoch + 1, 0, None
        start = (self.batch_in_epoch * self.world_size + self.rank) * self.batch_size
        self.batch_in_epoch += 1
        return self._permutation()[start: start + self.batch_size].tolist()

    @property
    def position(self) -> int:
        """Global batches drawn so far (counted over epochs)."""
        return self.epoch * self.batches_per_epoch + self.batch_in_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` stopped. If the global batch changed (another world size or
        batch size), continue after the examples already consumed in the epoch, rounded up to a
        whole global batch so that no example repeats within the epoch."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        old_global = int(state.get("global_batch", self.batch_size * self.world_size))
        new_global = self.batch_size * self.world_size
        if old_global != new_global:
            batch = -(-batch * old_global // new_global)
            if batch > self.batches_per_epoch:
                epoch, batch = epoch + 1, 0
        self.epoch, self.batch_in_epoch, self._perm = epoch, batch, None
