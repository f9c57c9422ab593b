"""DeepSpeed checkpoints: atomic saves and resume (also on another world size, through DeepSpeed's
universal checkpoint). The layout and metadata live in layout.py, exports in export.py; this module
is the part that saves and loads through DeepSpeed.

A save becomes visible only when complete: every rank writes into ``step-N.partial/``, then all
ranks meet, then rank 0 writes the metadata, renames the folder to ``step-N`` and replaces
``latest``. A crash at any point before that leaves the previous checkpoint as ``latest``. Weights
that hold NaN/inf on any rank are never saved (``NonFiniteWeights``); a rank that runs out of disk
space makes every rank give the save up at the next meeting point (``NoSpace``).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase

from cotmi_ds import __version__
from cotmi_ds.checkpoint import rng
from cotmi_ds.checkpoint.layout import (CHECKPOINTS, FORMAT, META, PARTIAL, RESUME_FIELDS, SHA256, T5_CONFIG,
                                        TOKENIZER, UNIVERSAL, CheckpointInfo, check_same_model, file_sizes,
                                        fsync_dirs, latest_in_run, rank_file, read_checkpoint, remove_partials,
                                        rotate, sha256_and_fsync, share_of, tag, unpublish, write_latest)
from cotmi_ds.distributed import DistEnv, all_gather_objects, all_reduce_sum, barrier
from cotmi_ds.errors import UsageError
from cotmi_ds.files import disk_full, write_json_atomic, write_problem


class NonFiniteWeights(Exception):
    """The weights hold NaN/inf on at least one rank: nothing was written, ``latest`` is unchanged."""


class NoSpace(Exception):
    """A rank ran out of disk space (or quota) while saving: the unfinished save is removed and
    ``latest`` is unchanged, on every rank."""


def weights_finite(engine, env: DistEnv) -> bool:
    """One agreed check before a save: each rank looks at the weights it holds (its ZeRO-3
    partition, else the module's parameters, which at ZeRO-1/2 are copies of the fp32 masters) and
    the ranks all-reduce the count of tensors holding NaN/inf. One pass over the local weights, one
    host sync and one small collective."""
    flags = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all() for p in engine.module.parameters()]
    bad = float((~torch.stack(flags)).sum().item()) if flags else 0.0
    return all_reduce_sum([bad], env)[0] == 0


class Checkpointer:
    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int, describe: dict[str, Any],
                 after_write: Callable[[int, int], None] | None = None):
        """``describe``: what every checkpoint's metadata records about the run (model identity,
        world size, ZeRO stage, precision, config). ``after_write(rank, step)`` is called once this
        rank has written its files, before the others are told (a fault-injection point)."""
        self.root = run_dir / CHECKPOINTS
        self.env, self.keep_last, self.describe = env, keep_last, describe
        self.after_write = after_write

    def latest(self) -> Path | None:
        return latest_in_run(self.root.parent)

    def save(self, engine, step: int, t5, tokenizer: PreTrainedTokenizerBase, trainer: dict[str, Any]) -> Path:
        """Every rank calls this (DeepSpeed's save is a collective). Returns the checkpoint folder.
        Raises ``NonFiniteWeights`` (on every rank, before anything is written) when the weights
        hold NaN/inf."""
        env, root = self.env, self.root
        if not weights_finite(engine, env):
            raise NonFiniteWeights(f"the weights hold NaN/inf after step {step}")
        partial = root / (tag(step) + PARTIAL)
        if env.is_main:
            root.mkdir(parents=True, exist_ok=True)
            remove_partials(root)
        barrier(env)

        def write():
            engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
            write_json_atomic(partial / rank_file(env.rank), {"rank": env.rank, "rng": rng.capture()},
                              durable=True, indent=1)
            if env.is_main:
                t5.config.to_json_file(partial / T5_CONFIG)
                tokenizer.save_pretrained(partial / TOKENIZER)
            if self.after_write is not None:
                self.after_write(env.rank, step)

        self._all_wrote(self._attempt(write), partial)  # every rank has written all it writes
        # The ranks hash and flush a share of the files each (their own shards first), in parallel.
        sizes = file_sizes(partial)
        mine: dict[str, str] = {}
        failed = self._attempt(lambda: mine.update(sha256_and_fsync(partial, share_of(sizes, env.rank,
                                                                                      env.world_size))))
        sums = all_gather_objects(failed or mine, env)  # flushing is where a full disk often shows
        self._all_wrote(next((part for part in sums if isinstance(part, str)), None), partial)
        final = root / tag(step)

        def publish():
            meta = {"format": FORMAT, "step": step, **self.describe, "trainer": trainer,
                    # DeepSpeed's counters under its own names (its skipped_steps: updates it skipped)
                    "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                               "skipped_steps": engine.skipped_steps},
                    "files": sizes, SHA256: dict(sorted(kv for part in sums for kv in part.items())),
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions()}
            fsync_dirs(partial)
            write_json_atomic(partial / META, meta, durable=True, indent=1)
            aside = root / (tag(step) + ".replaced" + PARTIAL)
            if final.exists():  # from a timeline abandoned by resuming an earlier checkpoint here
                unpublish(root, final.name)
                final.rename(aside)
            partial.rename(final)
            write_latest(root, final.name)
            shutil.rmtree(aside, ignore_errors=True)
            rotate(root, self.keep_last)

        self._all_wrote(self._attempt(publish) if env.is_main else None, partial)
        return final

    def _attempt(self, write) -> str | None:
        """Run this rank's part of a save; a full disk (or quota) becomes the line that says so,
        anything else is raised as it is."""
        try:
            write()
        except Exception as e:  # noqa: BLE001 - libraries report a full disk as all kinds of exceptions
            if not disk_full(e, self.root):
                raise
            return write_problem(e, self.root) if isinstance(e, OSError) else f"no space left on {self.root}"
        return None

    def _all_wrote(self, problem: str | None, partial: Path) -> None:
        """Where a barrier would be: every rank learns whether one of them ran out of space, and then
        all give the save up together (rank 0 removes the unfinished folder; ``latest`` stays)."""
        if all_reduce_sum([float(problem is not None)], self.env)[0] == 0:
            return
        if self.env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise NoSpace(problem or "another rank ran out of disk space")


def _versions() -> dict[str, str]:
    import deepspeed
    import transformers

    return {"cotmi_ds": __version__, "deepspeed": deepspeed.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


@contextlib.contextmanager
def quiet():
    """DeepSpeed's conversion tools print progress lines and bars meant for their own CLIs."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def needs_universal(info: CheckpointInfo, world_size: int, zero_stage: int) -> bool:
    """Another world size at ZeRO 1-3 goes through a universal checkpoint; ZeRO-0 checkpoints hold
    whole states and load at any world size, and continue at ZeRO-1/2 through one too (the
    project's conversion, zero0.py). Other changes of stage are refused: DeepSpeed's
    universal format, as of 0.19, loads a stage-1/2 conversion at stage 1/2 only, and ZeRO-0 loads
    no universal checkpoint."""
    if info.zero_stage == 0 and zero_stage in (1, 2):
        return True
    if info.zero_stage != zero_stage:
        into = " or ZeRO-1/2" if info.zero_stage == 0 else ""
        raise UsageError(f"--resume {info.path}: saved at ZeRO-{info.zero_stage}, this run uses "
                         f"ZeRO-{zero_stage}; resume with a stage-{info.zero_stage}{into} --ds_config")
    return zero_stage > 0 and info.world_size != world_size


def open_for_resume(path: Path, identity: dict[str, Any], max_steps: int) -> CheckpointInfo:
    """The checkpoint --resume continues from, checked against this run (complete, same model, not
    beyond max_steps; its ZeRO stage: needs_universal)."""
    # rank 0 verified the sums when it chose it
    info = read_checkpoint(path, "--resume", verify=False, requires=RESUME_FIELDS)
    check_same_model(info, identity, "--resume")
    if info.step > max_steps:
        raise UsageError(f"--resume {info.path} is at step {info.step}, beyond --max_steps {max_steps}")
    return info


def _ensure_universal(info: CheckpointInfo, env: DistEnv) -> None:
    """Rank 0 converts the checkpoint once into ``<checkpoint>/universal`` (DeepSpeed's
    ds_to_universal, run in-process and serially; a ZeRO-0 checkpoint: zero0.py); the
    others wait."""
    out = info.path / UNIVERSAL
    if env.is_main and not out.is_dir():
        tmp = info.path / (UNIVERSAL + PARTIAL)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"converting {info.path} (world size {info.world_size}, ZeRO-{info.zero_stage}) to a "
              f"universal checkpoint for world size {env.world_size}", flush=True)
        if info.zero_stage == 0:
            from cotmi_ds.checkpoint.zero0 import write_universal

            write_universal(info.path, tmp)
        else:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            args = Namespace(input_folder=str(info.path), output_folder=str(tmp), num_extract_workers=1,
                             num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
            with quiet():
                ds_to_universal(args)
        tmp.rename(out)
    barrier(env, after_solo_work=True)


def _apply_restored_schedule(engine) -> None:
    """The optimizer comes back with the learning rate it had when saved, i.e. from the saved run's
    schedule; a schedule recomputed for a new --max_steps would otherwise only apply from the
    second step after the resume. Set this step's rate from the restored scheduler now."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        return
    for group, base, fn in zip(engine.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)


def load(engine, info: CheckpointInfo, env: DistEnv, universal: bool, seed: int) -> dict[str, Any]:
    """Model, optimizer and scheduler through DeepSpeed; this rank's RNG states; returns the
    trainer's own state (step, data position, evaluations, ...)."""
    if universal:
        _ensure_universal(info, env)
        load_dir, load_tag = info.path, UNIVERSAL
    else:
        load_dir, load_tag = info.path.parent, info.path.name
    path, _ = engine.load_checkpoint(str(load_dir), tag=load_tag, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {info.path}")
    _apply_restored_schedule(engine)
    mine = info.path / rank_file(env.rank)
    if mine.is_file():
        rng.restore(json.loads(mine.read_text())["rng"])
    else:  # the world grew: ranks beyond the old world size start from a fresh, deterministic state
        rng.reseed(seed + 1_000_003 * info.step + env.rank)
    return info.meta["trainer"]
