"""The one flag parser (cotmi_ds/flags.py): ranges, choices, coercion and unknown names, and the
help and docs generated from the same fields."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from cotmi_ds.errors import UsageError
from cotmi_ds.flags import describe_flags, flag, markdown_tables, parse_flags


@dataclass
class Opts:
    steps: int = flag(3, "steps per run", range=">= 2", note="the first is not timed", section="Run")
    rate: float = flag(0.5, "a fraction", range="(0, 1]")
    keep: float = flag(0.0, "kept fraction", range="[0, 1)")
    mode: str = flag("mi", "which mode", ("dss", "mi"), section="Method")
    name: str | None = flag(None, "a name")
    fast: bool = flag(False, "go fast")


def error(flags: dict) -> str:
    with pytest.raises(UsageError) as e:
        parse_flags(Opts, flags, "cotmi demo")
    return str(e.value)


@pytest.mark.parametrize("flags, message", [
    ({"steps": 1}, "--steps must be >= 2 (the first is not timed), got 1"),
    ({"rate": 0}, "--rate must be in (0, 1], got 0.0"),
    ({"rate": 1.5}, "--rate must be in (0, 1], got 1.5"),
    ({"keep": 1}, "--keep must be in [0, 1), got 1.0"),
    ({"keep": -0.1}, "--keep must be in [0, 1), got -0.1"),
    ({"rate": "nan"}, "--rate must be a finite number, got nan"),
    ({"mode": "std"}, "--mode 'std' is not one of: dss, mi"),
    ({"stepz": 3}, "unknown flag --stepz for `cotmi demo` (did you mean 'steps'?)"),
    ({"steps": 2.5}, "--steps: expected int, got 2.5"),
    ({"steps": True}, "--steps: expected int, got True"),
    ({"fast": "maybe"}, "--fast: expected bool, got 'maybe'"),
    ({"name": ["a", "b"]}, "--name: expected str or null, got ['a', 'b']"),
])
def test_a_bad_value_is_one_line_naming_the_flag(flags, message):
    assert error(flags) == message


def test_values_are_coerced_to_the_fields_types_and_the_bounds_are_inclusive_where_written():
    opts = parse_flags(Opts, {"steps": "2", "rate": 1, "keep": 0, "fast": "yes", "name": ("a", "b")})
    assert (opts.steps, opts.rate, opts.keep, opts.fast) == (2, 1.0, 0.0, True)
    assert opts.name == "a,b"  # Fire hands "a,b" over as a tuple
    assert parse_flags(Opts, {"steps": 4.0, "name": "null"}).steps == 4
    assert parse_flags(Opts, {"name": "null"}).name is None


def test_a_malformed_range_fails_where_it_is_declared():
    with pytest.raises(ValueError, match="not a range"):
        flag(1, "x", range="0..1")


def test_help_and_docs_come_from_the_fields():
    text = describe_flags(Opts)
    assert text.splitlines()[:2] == ["Run:", "  --steps (default 3; >= 2; the first is not timed): steps per run"]
    assert "Method:\n  --mode (default 'mi'; dss, mi): which mode" in text
    md = markdown_tables(Opts)
    assert md.startswith("**Run**\n\n| flag | default | accepts | meaning |\n|---|---|---|---|\n| `--steps` | 3 |")
    assert "| `--rate` | 0.5 | (0, 1] | a fraction |" in md and "| `--name` | none |  | a name |" in md
