"""The answer cache: one JSON line per answered request, appended the moment the answer arrives, so a
job killed at any point and started again asks no answered question twice and loses none.

Each line is written with one ``write`` call on a file opened for appending, which a killed process
cannot leave half done; only a machine crash (or a full disk) can leave a torn last line. The reader
drops exactly that, a last line without its newline that does not parse, and the next append starts
on a clean line; any other bad line is an error naming it. Lines are keyed by the request's hash
(the row's prompt and every setting that decides the completion, see job.py), so a cache holds the
answers of several settings side by side.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cotmi_ds.errors import UsageError


class AnswerCache:
    def __init__(self, path: Path):
        self.path = path
        self.torn = False  # a torn last line was dropped when the cache was read

    def read(self) -> dict[str, dict[str, Any]]:
        """Every answer in the file by key (a key written twice: the later line wins)."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        answers: dict[str, dict[str, Any]] = {}
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            last = lineno == len(lines)  # no newline after it
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                    raise ValueError("not an answer record")
            except ValueError as e:
                if last:
                    self._drop_torn_tail(len(data) - len(raw))
                    break
                raise UsageError(f"{self.path}:{lineno}: not an answer record ({e}); this file is written "
                                 "by `cotmi teach` only: remove that line, or the file to start afresh") from None
            if last:  # complete but for its newline: keep it, and end it so the next append is clean
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            answers[record["key"]] = record
        return answers

    def _drop_torn_tail(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
        self.torn = True

    def open(self) -> "AnswerCache":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while line:  # one call in practice: a regular file takes the whole buffer
            line = line[os.write(self._fd, line):]

    def close(self) -> None:
        """Flush to disk (survives a machine crash from here on)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.fsync(fd)
            os.close(fd)
