"""The training batch source: micro-batches in ``BatchOrder``'s order, collated for the mode and
moved to the device, with what telemetry counts about each.

On GPUs a batch is copied from pinned (page-locked) host memory with ``non_blocking=True``: the copy
is queued on the stream like a kernel and the host goes on. From ordinary (pageable) memory torch
waits for the copy to finish (c10/cuda/CUDAFunctions.h ``memcpy_and_sync``), i.e. for everything
queued before it. Everything telemetry counts is read from the host-side batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset

from cotmi_ds.data.collate import collate, count_tokens
from cotmi_ds.data.sampler import BatchOrder
from cotmi_ds.model.flops import train_step_flops
from cotmi_ds.modes import Mode


@dataclass
class MicroBatch:
    batch: dict[str, torch.Tensor]
    position: int   # micro-steps drawn before this one (counted over epochs)
    samples: int    # rows that count (0: a stand-in row, see sampler.py)
    tokens: int     # non-pad tokens read and predicted in rows that count
    flops: int      # model FLOPs of its training step
    weight: float   # loss multiplier (1 in a full global batch)


class BatchSource:
    def __init__(self, split: Dataset, order: BatchOrder, pad_id: int, mode: Mode, t5_config,
                 device: torch.device):
        self.split, self.order, self.pad_id, self.mode = split, order, pad_id, mode
        self.t5_config, self.device = t5_config, device

    def next(self) -> MicroBatch:
        position = self.order.position
        draw = self.order.next()
        rows = self.split[draw.indices]
        batch = collate(rows, self.pad_id, self.mode.rationale_pass, self.mode.target_column)
        tokens = count_tokens(batch) if draw.samples else 0
        return MicroBatch(to_device(batch, self.device), position, samples=draw.samples, tokens=tokens,
                          flops=train_step_flops(self.t5_config, batch), weight=draw.weight)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Pinned and non-blocking on GPUs (the pinned buffers come from torch's caching host allocator,
    which keeps each one until its copy is done); as is on CPUs."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
