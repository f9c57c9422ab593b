"""The run directory: chosen once (rank 0 decides, every rank agrees), created only when the run is
known to be valid, so a bad flag or file leaves nothing behind."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import TrainConfig, UsageError
from .distributed import DistEnv, broadcast_str


def choose_run_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """Rank 0 picks the name (a timestamp would differ between ranks) and checks it is free."""
    decision = None
    if env.is_main:
        path = Path(cfg.output_dir or f"runs/{cfg.dataset}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        if path.exists() and not path.is_dir():
            decision = f"error:--output_dir {path} exists and is not a directory"
        elif path.is_dir() and any(path.iterdir()) and not cfg.overwrite:
            decision = (f"error:--output_dir {path} already holds a run; choose another directory "
                        "or pass --overwrite true")
        else:
            decision = f"ok:{path}"
    decision = broadcast_str(decision, env)
    status, _, value = decision.partition(":")
    if status == "error":
        raise UsageError(value)
    return Path(value)


def create_run_dir(path: Path, env: DistEnv, config_yaml: str, ds_config: dict) -> None:
    if env.is_main:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.yaml").write_text(config_yaml)
        (path / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def write_json(path: Path, payload: dict, env: DistEnv) -> None:
    """Rank 0 writes atomically: a reader never sees half a file."""
    if env.is_main:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)


def write_jsonl(path: Path, rows: list[dict], env: DistEnv) -> None:
    """Rank 0 writes one JSON object per line, atomically (the directory is created if needed)."""
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
