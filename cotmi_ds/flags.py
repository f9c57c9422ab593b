"""Flags as dataclass fields, and the one parser for them.

A flag is declared once, as a field made by ``flag()``: its default, its help, and the values it
accepts (``choices``, a ``range`` such as ``"> 0"``, ``">= 1"`` or ``"[0, 1)"``). Everything else is
derived from the fields: ``parse_flags`` (flags as Fire hands them over -> the dataclass, with one-line
errors), ``check_fields`` (choices and ranges, for values set any other way), ``describe_flags``
(the text of ``--help``) and ``markdown_tables`` (the tables of docs/configuration.md). `cotmi train`
(TrainConfig), `cotmi plan` and the benchmarks all parse their flags here. Standard library only.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from typing import Any

from cotmi_ds.errors import UsageError, brief

_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


def flag(default: Any, help: str, choices: tuple | None = None, *, range: str | None = None,
         note: str | None = None, section: str | None = None, paths: bool = False):
    """A dataclass field that is a flag. ``range``: "> 0", ">= 1", "[0, 1]", "(0, 1]", "[0, 1)", ...;
    ``note``: what a special value in it means (e.g. "0: automatic"), shown with a range error;
    ``section``: starts a group of flags (in --help and the docs) with this field; ``paths``: a value
    outside ``choices`` is a path (one the system can look up; the caller checks what it holds)."""
    if range is not None:
        _in_range(0.0, range)  # a malformed range fails where it is declared
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "range": range,
                                                        "note": note, "section": section, "paths": paths})


def _in_range(value: float, spec: str) -> bool:
    interval, bound = _INTERVAL.match(spec), _BOUND.match(spec)
    if interval:
        left, low, high, right = interval.groups()
        low_ok = value >= float(low) if left == "[" else value > float(low)
        return low_ok and (value <= float(high) if right == "]" else value < float(high))
    if bound:
        op, limit = bound.groups()
        return {">": value > float(limit), ">=": value >= float(limit),
                "<": value < float(limit), "<=": value <= float(limit)}[op]
    raise ValueError(f"not a range: {spec!r}")


def suggest(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(value: Any, hint: Any, where: str) -> Any:
    """A flag's or a file's value as the field's type (bool, int, float, str, optionally None), or a
    UsageError naming ``where``. Fire hands "a,b" over as a tuple: it is joined back into "a,b"."""
    optional = type(None) in typing.get_args(hint)
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    bad = UsageError(f"{where}: expected {base.__name__}{' or null' if optional else ''}, got {brief(value)}")
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise bad
    if isinstance(value, bool) and base is not bool:
        raise bad
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if base is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise bad
    if base is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if base is str:
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    raise AssertionError(f"unhandled flag type {hint}")


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot be looked up as a path at all (the system would raise, not say "no such
    file"), or None."""
    try:
        encoded = os.fsencode(os.path.expanduser(value))
    except (UnicodeError, ValueError):
        return "not encodable as a file name"
    if b"\0" in encoded:
        return "it holds a NUL byte"
    if len(encoded) >= 4096:
        return f"{len(encoded):,} bytes long, where a path holds at most 4,095"
    longest = max(len(part) for part in encoded.split(b"/"))
    return f"a name of {longest:,} bytes in it, where a file name holds at most 255" if longest > 255 else None


def check_value(name: str, field: dataclasses.Field, value: Any) -> None:
    """The value's choices, finiteness and range, as one line naming the flag; a path, one the
    system can look up."""
    meta = field.metadata
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"] and not meta.get("paths"):
        raise UsageError(f"--{name} {brief(value)} is not one of: {', '.join(meta['choices'])}")
    if meta.get("paths") and isinstance(value, str) and value not in (meta.get("choices") or ()):
        why = path_problem(value)
        if why:
            raise UsageError(f"--{name} {brief(value)}: not a usable path: {why}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"--{name} must be a finite number, got {value}")
    spec = meta.get("range")
    if spec and not _in_range(value, spec):
        where = f"in {spec}" if _INTERVAL.match(spec) else spec
        note = f" ({meta['note']})" if meta.get("note") else ""
        raise UsageError(f"--{name} must be {where}{note}, got {brief(value)}")


def check_fields(obj) -> None:
    for f in dataclasses.fields(obj):
        if "help" in f.metadata:
            check_value(f.name, f, getattr(obj, f.name))


def parse_flags(cls, flags: dict[str, Any], command: str | None = None):
    """Flags (name -> value, as Fire passes them) -> ``cls``, every name and value checked: an unknown
    name gets a close match, values are coerced to the fields' types, choices and ranges hold."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in flags.items():
        if key not in fields:
            raise UsageError(f"unknown flag --{key}" + (f" for `{command}`" if command else "")
                             + suggest(key, fields))
        values[key] = coerce(value, hints[key], f"--{key}")
    obj = cls(**values)
    check_fields(obj)
    return obj


def _accepts(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = [", ".join(meta["choices"]) + (", or a path" if meta.get("paths") else "")] if meta.get("choices") else []
    if meta.get("range"):
        parts.append(meta["range"] + (f"; {meta['note']}" if meta.get("note") else ""))
    return "; ".join(parts)


def _grouped(cls):
    """(section heading or None, field) for each flag, the heading where a section starts."""
    first = True
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            heading = f.metadata.get("section") or ("Flags" if first else None)
            first = False
            yield heading, f


def describe_flags(cls) -> str:
    """One line per flag (default, what it accepts, help), under its section's name: for --help."""
    lines = []
    for heading, f in _grouped(cls):
        if heading:
            lines.append(f"{heading}:")
        accepts = _accepts(f)
        lines.append(f"  --{f.name} (default {f.default!r}{'; ' + accepts if accepts else ''}): "
                     f"{f.metadata['help']}")
    return "\n".join(lines)


def _markdown_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def _markdown_text(text: str) -> str:
    """Plain text in a table cell: '|' would end the cell and '<name>' would be read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def markdown_tables(cls) -> str:
    """The flags as Markdown: one table per section, with each flag's default, accepted values and help."""
    out = []
    for heading, f in _grouped(cls):
        if heading:
            out += ["", f"**{heading}**", "", "| flag | default | accepts | meaning |", "|---|---|---|---|"]
        out.append(f"| `--{f.name}` | {_markdown_default(f.default)} | {_markdown_text(_accepts(f))} | "
                   f"{_markdown_text(f.metadata['help'])} |")
    return "\n".join(out[1:]) + "\n"
