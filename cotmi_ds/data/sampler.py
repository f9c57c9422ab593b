"""A deterministic, resumable order of micro-batches for one rank.

Epoch e is a permutation drawn from (seed, e), cut into global batches of ``world_size * grad_accum
* batch_size`` consecutive indices; the last global batch of an epoch keeps the remainder, as the
Hugging Face Trainer of the released code does (``dataloader_drop_last=False``). A global batch is
one optimizer step: ``grad_accum`` micro-steps in which every rank draws one micro-batch. A full
batch gives every rank ``batch_size`` rows; the partial one is split into ``world_size * grad_accum``
near-equal parts (sizes differ by at most one), so a rank may get fewer rows or none. Every rank
still runs the same number of micro-batches: one without rows runs a stand-in row with weight 0.

Each draw carries a loss weight, its rows over the average rows per micro-batch of its global batch:
DeepSpeed averages the micro-batch losses over ranks and accumulation steps, so the weighted losses
average to the loss of the whole batch, each row counting as much as in a full batch (the release
averages over the 16 rows of SVAMP's last batch). Full batches have weight 1.

Length grouping (``group_by_length``, as the Hugging Face Trainer's ``group_by_length``): the epoch's
permutation is cut into mega-batches of ``MEGA_BATCH`` global batches, and each mega-batch is sorted
by row length, longest first, so the rows of one batch have similar lengths and pad little. Then the
epoch's full global batches are shuffled (the Trainer keeps them sorted: fifty steps from long rows
to short ones, over and over); the partial one stays last. The order still comes from (seed, epoch)
alone, and nothing else changes: every row once per epoch, the partial last batch, the weights.

The position is two integers, so a resumed run continues from the exact micro-batch where it stopped;
on another world size, grad_accum or batch size it continues after the rows already consumed in the
epoch (exactly at a global-batch boundary, which is where checkpoints are taken when the global
batch is unchanged). The epoch a run resumes in keeps the order it was started with (grouped or not,
with its mega-batch and global batch), so a resume that changes them never repeats a row of that epoch; the
next epoch follows the new settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

MEGA_BATCH = 50  # global batches per sorted mega-batch, as the Hugging Face Trainer's grouping


@dataclass(frozen=True)
class Draw:
    indices: list[int]  # rows to run: this rank's share, or one stand-in row when it has none
    samples: int        # rows that count (0 for a stand-in)
    weight: float       # loss multiplier: samples / average rows per micro-batch of this global batch


@dataclass
class BatchOrder:
    num_examples: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    grad_accum: int = 1
    epoch: int = 0
    batch_in_epoch: int = 0   # micro-steps (one micro-batch on every rank) drawn in this epoch
    lengths: Sequence[int] | None = field(default=None, repr=False, compare=False)  # per row, for grouping
    group_by_length: bool = False

    def __post_init__(self):
        if self.num_examples == 0:
            raise ValueError("the training split is empty")
        self.global_batch = self.batch_size * self.world_size * self.grad_accum
        self.parts = self.world_size * self.grad_accum  # micro-batches per global batch
        full, self.last_batch_rows = divmod(self.num_examples, self.global_batch)
        self.global_batches_per_epoch = full + (self.last_batch_rows > 0)
        self.batches_per_epoch = self.global_batches_per_epoch * self.grad_accum
        if self.group_by_length and self.lengths is None:
            raise ValueError("group_by_length needs the rows' lengths")
        if self.lengths is not None and len(self.lengths) != self.num_examples:
            raise ValueError(f"{len(self.lengths)} lengths for {self.num_examples} rows")
        # rows per sorted mega-batch (0: not grouped); small splits get smaller mega-batches, as in HF
        mult = max(1, min(MEGA_BATCH, self.num_examples // (4 * self.global_batch)))
        self.group_rows = self.global_batch * mult if self.group_by_length else 0
        # (epoch, mega-batch rows, global batch) of a resumed epoch that keeps its grouping
        self._resumed_grouping: tuple[int, int, int] | None = None
        self._perm: torch.Tensor | None = None

    def _epoch_grouping(self) -> tuple[int, int]:
        """(mega-batch rows, global batch) this epoch is grouped with; 0 rows: not grouped."""
        if self._resumed_grouping is not None and self._resumed_grouping[0] == self.epoch:
            return self._resumed_grouping[1:]
        return self.group_rows, self.global_batch

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.num_examples, generator=g)
            rows, global_batch = self._epoch_grouping()
            if rows:
                if self.lengths is None:
                    raise ValueError("this epoch was started with length grouping: resuming it needs the "
                                     "rows' lengths")
                lengths = torch.as_tensor(self.lengths)
                perm = torch.cat([mega[torch.argsort(lengths[mega], descending=True, stable=True)]
                                  for mega in perm.split(rows)])
                full = self.num_examples // global_batch * global_batch
                batches = perm[:full].view(-1, global_batch)
                perm = torch.cat([batches[torch.randperm(len(batches), generator=g)].flatten(), perm[full:]])
            self._perm = perm
        return self._perm

    def _part_start(self, micro_step: int, part: int) -> tuple[int, int, int]:
        """(epoch offset where part ``part`` of micro-step ``micro_step``'s global batch starts, its
        rows, the rows of that global batch)."""
        batch, accum = divmod(micro_step, self.grad_accum)
        base = batch * self.global_batch
        rows = min(self.global_batch, self.num_examples - base)
        size, extra = divmod(rows, self.parts)
        p = accum * self.world_size + part
        return base + p * size + min(p, extra), size + (p < extra), rows

    def rows_before(self, micro_step: int) -> int:
        """Rows of the epoch consumed (by all ranks) before micro-step ``micro_step``."""
        if micro_step >= self.batches_per_epoch:
            return self.num_examples
        return self._part_start(micro_step, 0)[0]

    def next(self) -> Draw:
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._perm = self.epoch + 1, 0, None
        micro_step = self.batch_in_epoch
        start, size, rows = self._part_start(micro_step, self.rank)
        self.batch_in_epoch += 1
        if size == 0:  # a partial batch left this rank nothing: its first row stands in, weight 0
            first = micro_step // self.grad_accum * self.global_batch
            return Draw(self._permutation()[first: first + 1].tolist(), 0, 0.0)
        return Draw(self._permutation()[start: start + size].tolist(), size, size * self.parts / rows)

    def next_indices(self) -> list[int]:
        """The rows of the next micro-batch that count (empty for a stand-in)."""
        draw = self.next()
        return draw.indices[:draw.samples]

    @property
    def position(self) -> int:
        """Micro-steps drawn so far (counted over epochs)."""
        return self.epoch * self.batches_per_epoch + self.batch_in_epoch

    def _layout(self) -> list[int]:
        return [self.num_examples, self.batch_size, self.world_size, self.grad_accum]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "rows_in_epoch": self.rows_before(self.batch_in_epoch), "layout": self._layout(),
                "group_rows": self._epoch_grouping()[0]}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped: at the same micro-step if the layout is the same, else
        after the rows already consumed in the epoch, rounded up to a whole micro-step so that no
        example repeats within the epoch (exact at a global-batch boundary)."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        group_rows = int(state.get("group_rows", 0))  # absent: written before grouping existed
        layout = state.get("layout")
        then = (group_rows, layout[1] * layout[2] * layout[3] if group_rows else 0)  # its batches were shuffled
        now = (self.group_rows, self.global_batch if self.group_rows else 0)
        self._resumed_grouping = (epoch, *then) if then != now else None
        if state.get("layout") != self._layout():
            if "rows_in_epoch" in state:
                consumed = int(state["rows_in_epoch"])
            else:  # written before partial batches were kept: micro-steps of `global_batch` rows
                consumed = batch * int(state["global_batch"])
            batch = self._micro_step_at(min(consumed, self.num_examples))
        elif not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"the data position (micro-step {batch}) lies outside an epoch of "
                             f"{self.batches_per_epoch} micro-steps")
        self.epoch, self.batch_in_epoch, self._perm = epoch, batch, None

    def _micro_step_at(self, consumed: int) -> int:
        whole, rest = divmod(consumed, self.global_batch)
        if rest == 0 or consumed == self.num_examples:  # a global-batch boundary: its first micro-step
            return min(whole + (rest > 0), self.global_batches_per_epoch) * self.grad_accum
        return next(k for k in range(self.batches_per_epoch + 1) if self.rows_before(k) >= consumed)
