"""The run directory: chosen once (rank 0 decides, every rank agrees), created only when the run is
known to be valid, so a bad flag or file leaves nothing behind."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from cotmi_ds.checkpoint.layout import CHECKPOINTS, latest_in_run, read_checkpoint, resolve, run_dir_of
from cotmi_ds.config import TrainConfig
from cotmi_ds.data.own import dataset_name
from cotmi_ds.distributed import DistEnv, broadcast_str
from cotmi_ds.errors import UsageError
from cotmi_ds.files import write_json_atomic, write_text_atomic


# What marks a directory as holding a run (--overwrite replaces only such a directory).
RUN_MARKERS = ("config.yaml", "status.json", CHECKPOINTS)


def choose_run_dir(cfg: TrainConfig, env: DistEnv) -> tuple[Path, Path | None, bool]:
    """Rank 0 picks the run directory (a timestamp would differ between ranks), with --resume the
    checkpoint to continue from, and whether the directory's old run is to be replaced
    (--overwrite); every rank gets the same answer or the same error."""
    decision = None
    if env.is_main:
        try:
            path, resume = _decide(cfg)
            replace = cfg.overwrite and _holds_other_run(path, resume)
            decision = json.dumps({"run": str(path), "resume": None if resume is None else str(resume),
                                   "replace": replace})
        except UsageError as e:
            decision = json.dumps({"error": str(e)})
    answer = json.loads(broadcast_str(decision, env))
    if "error" in answer:
        raise UsageError(answer["error"])
    return Path(answer["run"]), None if answer["resume"] is None else Path(answer["resume"]), answer["replace"]


def _holds_other_run(path: Path, resume: Path | None) -> bool:
    """Whether ``path`` is non-empty and is not the run being continued. A non-empty directory that
    holds no run is refused: --overwrite never empties a folder that is not a run."""
    if not path.is_dir() or not any(path.iterdir()):
        return False
    if resume is not None and path.resolve() in (resume.resolve(), *resume.resolve().parents):
        if run_dir_of(resume) is not None and run_dir_of(resume).resolve() == path.resolve():
            return False  # continuing this run
        raise UsageError(f"--overwrite would delete --resume {resume}, which lies inside --output_dir {path}")
    if not any((path / marker).exists() for marker in RUN_MARKERS):
        raise UsageError(f"--output_dir {path} is not empty and holds no run; --overwrite only replaces a "
                         "run directory: choose a new or empty directory")
    return True


def _check_writable(path: Path) -> None:
    """The run directory exists as a writable folder or can be created: checked before data
    preparation, not found out after it."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {path} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output_dir {path}: cannot be created ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {path}: cannot be {'written' if existing == path else 'created'} "
                         f"(no write permission on {existing})")


def _decide(cfg: TrainConfig) -> tuple[Path, Path | None]:
    path, resume = _choose(cfg)
    _check_writable(path)  # before data preparation, not found out after it
    return path, resume


def _choose(cfg: TrainConfig) -> tuple[Path, Path | None]:
    if cfg.resume == "auto":  # this directory is the run: continue it, or start it if it has no checkpoint
        path = Path(cfg.output_dir)
        resume = latest_in_run(path)
        if resume is not None:
            read_checkpoint(resume, "--resume auto:")
        return path, resume
    resume = None
    if cfg.resume is not None:
        resume = resolve(cfg.resume, "--resume")
        read_checkpoint(resume, "--resume")
        own_run = run_dir_of(resume)
        if cfg.output_dir is None:
            if own_run is None:
                raise UsageError(f"--resume {resume} is not inside a run directory; give --output_dir")
            return own_run, resume
        if own_run is not None and Path(cfg.output_dir).resolve() == own_run.resolve():
            return own_run, resume
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset_name(cfg.dataset))
    path = Path(cfg.output_dir or f"runs/{name}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    if path.is_dir() and any(path.iterdir()) and not cfg.overwrite:
        raise UsageError(f"--output_dir {path} already holds a run; choose another directory, pass "
                         "--overwrite true, or continue it with --resume auto")
    return path, resume


def create_run_dir(path: Path, env: DistEnv, config_yaml: str, ds_config: dict, replace: bool = False) -> None:
    """Written only once every input is known to be valid (a resumed run rewrites both files: they
    describe the latest launch). ``replace``: delete the old run in ``path`` first (--overwrite), so
    that none of its state (status.json, checkpoints) outlives it."""
    if env.is_main:
        if replace:
            for entry in path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            print(f"--overwrite: removed the previous run in {path}", flush=True)
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / "config.yaml", config_yaml, durable=True)
        write_json_atomic(path / "ds_config.json", ds_config, durable=True)
