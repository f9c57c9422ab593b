"""Atomic file writes: a reader (a later step, a resumed run, a sweep, another rank) sees the old
file or the new one, never half of one. The one place that writes files this way."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cotmi_ds.errors import UsageError, not_utf8


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a machine crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Write a temporary file beside ``path``, then rename it over ``path``. ``durable``: flush the
    file and its directory entry to disk first (for files a crash must not lose)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: Any, durable: bool = False, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n", durable)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object per line (the directory is created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def json_error(path: Path, e: json.JSONDecodeError, line: int | None = None) -> UsageError:
    """One line naming the file, line and column of a JSON syntax error."""
    return UsageError(f"{path}:{line or e.lineno}: not valid JSON ({e.msg} at column {e.colno})")


def read_json(path: Path) -> Any:
    """A JSON file written by a person or another program: UTF-8 and syntax errors are one line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: {not_utf8(e)}") from None
    except json.JSONDecodeError as e:
        raise json_error(path, e) from None
