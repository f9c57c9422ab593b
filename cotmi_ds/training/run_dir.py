"""The run directory: chosen once (rank 0 decides, every rank agrees), created only when the run is
known to be valid, so a bad flag or file leaves nothing behind."""
from __future__ import annotations

import json
import time
from pathlib import Path

from cotmi_ds.checkpoint.layout import latest_in_run, read_checkpoint, resolve, run_dir_of
from cotmi_ds.config import TrainConfig, UsageError
from cotmi_ds.distributed import DistEnv, broadcast_str
from cotmi_ds.files import write_json_atomic, write_text_atomic


def choose_run_dir(cfg: TrainConfig, env: DistEnv) -> tuple[Path, Path | None]:
    """Rank 0 picks the run directory (a timestamp would differ between ranks) and, with --resume,
    the checkpoint to continue from; every rank gets the same answer or the same error."""
    decision = None
    if env.is_main:
        try:
            path, resume = _decide(cfg)
            decision = json.dumps({"run": str(path), "resume": None if resume is None else str(resume)})
        except UsageError as e:
            decision = json.dumps({"error": str(e)})
    answer = json.loads(broadcast_str(decision, env))
    if "error" in answer:
        raise UsageError(answer["error"])
    return Path(answer["run"]), None if answer["resume"] is None else Path(answer["resume"])


def _decide(cfg: TrainConfig) -> tuple[Path, Path | None]:
    if cfg.resume == "auto":  # this directory is the run: continue it, or start it if it has no checkpoint
        path = Path(cfg.output_dir)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--output_dir {path} exists and is not a directory")
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
    path = Path(cfg.output_dir or f"runs/{cfg.dataset}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not cfg.overwrite:
        raise UsageError(f"--output_dir {path} already holds a run; choose another directory, pass "
                         "--overwrite true, or continue it with --resume auto")
    return path, resume


def create_run_dir(path: Path, env: DistEnv, config_yaml: str, ds_config: dict) -> None:
    """Written only once every input is known to be valid (a resumed run rewrites both files: they
    describe the latest launch)."""
    if env.is_main:
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / "config.yaml", config_yaml)
        write_json_atomic(path / "ds_config.json", ds_config)
