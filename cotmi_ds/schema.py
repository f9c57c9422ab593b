"""The shape a JSON value read back must have (a checkpoint's metadata, a results file), declared
as data and checked in one pass: the first field that differs is named by its dotted path.

A schema is
    int, float, str, bool, dict, list   a value of that type (an int is no bool; a float is finite
                                        and may be written as an int)
    a tuple of values                   one of them
    {"name": schema, ...}               an object with these fields (others are allowed); wrap a
                                        field's schema in Optional() when it may be absent
    [schema]                            a list whose items all match
    MapOf(schema)                       an object with any names, every value matching
    Check(schema, test, says)           matches schema, and test(value) holds ("says" what it wants)
Standard library only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from cotmi_ds.errors import brief

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
               list: "a list"}


@dataclass(frozen=True)
class Optional:
    schema: Any


@dataclass(frozen=True)
class MapOf:
    schema: Any


@dataclass(frozen=True)
class Check:
    schema: Any
    test: Callable[[Any], bool]
    says: str


def problem(value: Any, schema: Any, path: str = "") -> str | None:
    """Why ``value`` does not match ``schema`` ("model.vocab_sha256: missing"), or None."""
    here = path or "the top level"
    if isinstance(schema, Check):
        return problem(value, schema.schema, path) or (
            None if schema.test(value) else f"{here}: expected {schema.says}, got {brief(value)}")
    if isinstance(schema, tuple):
        return None if value in schema and type(value) in {type(v) for v in schema} else (
            f"{here}: expected one of {', '.join(map(repr, schema))}, got {brief(value)}")
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{here}: expected an object, got {brief(value)}"
        for name, field in schema.items():
            inner = f"{path}.{name}" if path else name
            if name not in value:
                if not isinstance(field, Optional):
                    return f"{inner}: missing"
                continue
            found = problem(value[name], field.schema if isinstance(field, Optional) else field, inner)
            if found:
                return found
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{here}: expected a list, got {brief(value)}"
        return next((p for i, item in enumerate(value) if (p := problem(item, schema[0], f"{path}[{i}]"))), None)
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            return f"{here}: expected an object, got {brief(value)}"
        return next((p for key, item in value.items()
                     if (p := problem(item, schema.schema, f"{path}.{key}" if path else str(key)))), None)
    return None if _is(value, schema) else f"{here}: expected {_TYPE_NAMES[schema]}, got {brief(value)}"


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def at_least(low: float) -> Check:
    kind = float if isinstance(low, float) else int
    return Check(kind, lambda v: v >= low, f"{_TYPE_NAMES[kind]} >= {low}")
