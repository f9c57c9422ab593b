"""Flags (as Fire passes them) -> a benchmark's options dataclass, with one-line errors."""
from __future__ import annotations

import difflib
from dataclasses import fields


def parse_flags(options_cls, flags: dict, command: str, min_int: int = 0):
    """Unknown names get a close match; bools accept true/false; ints must be whole numbers
    >= ``min_int``; anything else becomes a string (a list Fire parsed is joined back with commas)."""
    from cotmi_ds.errors import UsageError

    names = [f.name for f in fields(options_cls)]
    values: dict = {}
    for key, value in flags.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise UsageError(f"unknown flag --{key} for `{command}`"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        default = getattr(options_cls, key)
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise UsageError(f"--{key}: expected true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < min_int:
                raise UsageError(f"--{key}: expected a whole number >= {min_int}, got {value!r}")
        else:
            value = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
        values[key] = value
    return options_cls(**values)
