"""Fault injection for the tests, and nothing else. Every hook is a no-op unless its COTMI_TEST_*
environment variable is set:

    COTMI_TEST_NAN=R:4,6-9          rank R's loss is NaN for global micro-batches 4 and 6..9
    COTMI_TEST_SIGNAL=R:S:SIGTERM   rank R sends itself the signal as step S begins
    COTMI_TEST_KILL_IN_SAVE=R:S     rank R SIGKILLs itself in the middle of saving step S's checkpoint
                                    (after writing its files, before the others know it finished)
    COTMI_TEST_GREEDY_DUMP=FILE     at the end of training rank 0 writes the engine's greedy outputs
                                    for the first 8 test inputs to FILE (JSON)
"""
from __future__ import annotations

import json
import os
import signal
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def _spec(name: str) -> list[str] | None:
    value = os.environ.get(name)
    return value.split(":") if value else None


@lru_cache(maxsize=None)
def _nan_batches(rank: int) -> frozenset[int]:
    spec = _spec("COTMI_TEST_NAN")
    if not spec or int(spec[0]) != rank:
        return frozenset()
    out = set()
    for part in spec[1].split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def poison_loss(parts: dict, rank: int, micro_batch: int) -> dict:
    if micro_batch in _nan_batches(rank):
        parts = dict(parts, total=parts["total"] * float("nan"))
    return parts


def signal_at_step(rank: int, step: int) -> None:
    spec = _spec("COTMI_TEST_SIGNAL")
    if spec and int(spec[0]) == rank and int(spec[1]) == step:
        os.kill(os.getpid(), getattr(signal, spec[2]))


def kill_in_save(rank: int, step: int) -> None:
    spec = _spec("COTMI_TEST_KILL_IN_SAVE")
    if spec and int(spec[0]) == rank and int(spec[1]) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def dump_greedy(t5, tokenizer, test_split, env, synced: bool) -> None:
    path = os.environ.get("COTMI_TEST_GREEDY_DUMP")
    if not path:
        return
    from .evaluate import generate_labels

    inputs = test_split[:8]["pred_input_ids"]
    was_training = t5.training
    t5.eval()
    outputs = generate_labels(t5, tokenizer, inputs, env.device, max_new_tokens=12, synced=synced)
    t5.train(was_training)
    if env.is_main:
        Path(path).write_text(json.dumps({"inputs": inputs, "outputs": outputs}))
