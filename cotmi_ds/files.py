"""Files in and out. Atomic writes: a reader (a later step, a resumed run, a sweep, another rank)
sees the old file or the new one, never half of one. Bounded reads of the JSON and YAML a person or
another program wrote: whatever the text holds, reading it ends in a value of bounded size and depth
whose strings can be written back, or in one line naming the file (and line). The one place that
writes and reads files this way."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from cotmi_ds.errors import UsageError, brief, not_utf8

# Deeper than anything cotmi writes or reads (a config is 2 levels, results.json 4), far below
# Python's recursion limit, which JSON, YAML, deepcopy and repr all run into.
MAX_DEPTH = 64
# Values a YAML file may stand for once its aliases are followed (a config or sweep file holds a few
# hundred): a 400-byte "billion laughs" file stands for 10^9 strings, and anything that walks or
# prints it would run out of time and memory. (JSON has no aliases: its size is the file's.)
MAX_YAML_VALUES = 100_000
# A \uD800-\uDFFF escape (not itself escaped): the only way JSON or YAML text, once decoded from
# UTF-8, can hold a surrogate, which no encoder (UTF-8, Arrow, a terminal) accepts alone.
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\(?:u|U0000)([dD][89a-fA-F][0-9a-fA-F]{2})")
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:  # a full disk, an interrupt: no half-written temporary file is left
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def disk_full(e: BaseException, path: Path) -> bool:
    """Whether a failed write ran out of space (disk or quota) under ``path``. Libraries say so in
    their own ways: an OSError (ENOSPC, EDQUOT), a Rust library's "No space left on device (os error
    28)", torch.save's "file write failed" with no reason at all: then the disk itself is asked."""
    for cause in (e, e.__cause__, e.__context__):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if cause is not None and any(text in str(cause).lower() for text in _NO_SPACE_TEXT):
            return True
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        return shutil.disk_usage(existing).free < 2**20
    except OSError:
        return False


def write_problem(e: OSError, path: Path) -> str:
    """What a failed write says, in one line: "no space left on <path>" for a full disk or quota,
    else the file and the system's reason."""
    where = e.filename or path
    return f"no space left on {where}" if disk_full(e, Path(where)) else f"{where}: {e.strerror or e}"


def write_json_atomic(path: Path, payload: Any, durable: bool = False, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n", durable)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object per line (the directory is created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_text(path: Path) -> str:
    """A text file as UTF-8, or one line saying it is not."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: {not_utf8(e)}") from None


def json_error(path: Path, e: json.JSONDecodeError, line: int | None = None) -> UsageError:
    """One line naming the file, line and column of a JSON syntax error."""
    return UsageError(f"{path}:{line or e.lineno}: not valid JSON ({e.msg} at column {e.colno})")


def loads_json(text: str, path: Path, line: int | None = None) -> Any:
    """JSON text from ``path`` (``line``: the line of a JSON Lines file it is), bounded: a syntax
    error, nesting deeper than MAX_DEPTH or a string no encoder accepts is one line naming it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise json_error(path, e, line) from None
    except RecursionError:
        raise UsageError(f"{path}{f':{line}' if line else ''}: nested deeper than {MAX_DEPTH} levels") from None
    # Cheap guards first: fewer brackets than MAX_DEPTH cannot nest deeper; no escape, no surrogate.
    if text.count("[") + text.count("{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(text):
        check_tree(data, path, text, line)
    return data


def read_json(path: Path) -> Any:
    """A JSON file written by a person or another program, read with ``loads_json``'s bounds."""
    return loads_json(read_text(path), path)


def read_yaml(path: Path) -> Any:
    """A YAML file written by a person, bounded as ``loads_json`` is, and its aliases too: a file
    that stands for more than MAX_YAML_VALUES values is refused before anything walks or prints it."""
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, e.g. a control character
        raise UsageError(f"{path}:{text.count(chr(10), 0, e.position) + 1}: not valid YAML: {e.reason} "
                         f"(character {brief(chr(e.character) if isinstance(e.character, int) else e.character)})"
                         ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or str(e)
        raise UsageError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML: {' '.join(what.split())}") from None
    except RecursionError:
        raise UsageError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    # YAML leaves an escaped surrogate pair as two surrogates
    check_tree(data, path, text, max_values=MAX_YAML_VALUES, pairs_combine=False)
    return data


def check_tree(data: Any, path: Path, text: str | None = None, line: int | None = None,
               max_values: int | None = None, pairs_combine: bool = True) -> None:
    """Depth, size (``max_values``, aliases followed) and encodable strings of a value parsed from
    ``text``, read from ``path`` (at ``line``), walked without recursion."""
    stack, seen = [(data, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if max_values is not None and seen > max_values:
            raise UsageError(f"{path}: stands for more than {max_values:,} values (YAML aliases repeated "
                             "inside each other?); write the values out")
        if depth > MAX_DEPTH:
            raise UsageError(f"{path}{f':{line}' if line else ''}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, str):
            found = _SURROGATE.search(node)
            if found:
                where = f"{path}:{line or _escape_line(text, pairs_combine) or '?'}"
                raise UsageError(f"{where}: text with an unpaired surrogate escape (\\u{ord(found.group()):x}), "
                                 "which is no character and cannot be written as UTF-8; remove it")
        elif isinstance(node, dict):
            stack.extend((item, depth + 1) for pair in node.items() for item in pair)
        elif isinstance(node, (list, tuple)):
            stack.extend((item, depth + 1) for item in node)


def _escape_line(text: str | None, pairs_combine: bool) -> int | None:
    """The line of the first surrogate escape that decodes alone (in JSON a high one directly
    followed by a low one is a pair: one character)."""
    matches = list(_SURROGATE_ESCAPE.finditer(text or ""))
    i = 0
    while i < len(matches):
        m = matches[i]
        high = m.group(1)[1].lower() in "89ab"
        nxt = matches[i + 1] if i + 1 < len(matches) else None
        if (pairs_combine and high and nxt is not None and nxt.start() == m.end()
                and nxt.group(1)[1].lower() in "cdef"):
            i += 2
            continue
        return text.count("\n", 0, m.start()) + 1
    return None
