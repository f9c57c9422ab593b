"""The docs state the code's facts as the code does: the flag tables and the README's flags with their
defaults."""
from __future__ import annotations

import dataclasses
import importlib.util
import re

import pytest

from cotmi_ds.config import TrainConfig
from tests.conftest import REPO

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _flag_tables():
    spec = importlib.util.spec_from_file_location("flag_tables", REPO / "docs" / "flag_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flag_tables_of_configuration_md_are_generated_from_train_config():
    tables = _flag_tables()
    assert tables.current(tables.PAGE.read_text()) == tables.generated(), \
        "docs/configuration.md's flag tables differ from TrainConfig: run python docs/flag_tables.py"


def _readme_flag_rows() -> list[tuple[list[str], list[str]]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Main flags"):text.index("## What a run writes")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`--(\w+)`", cells[0]) if len(cells) == 3 else []
        if names:
            rows.append((names, cells[1].split(", ")))
    return rows


def _states(cell: str, default) -> bool:
    """Whether a README default cell (its leading word) says the field's default."""
    if default is None:
        return True  # the cell says in words what None means ("none", "the model's own", ...)
    if isinstance(default, bool):
        return cell.split()[0] == str(default).lower()
    if isinstance(default, str):
        return cell.startswith(f"`{default}`")
    return float(cell.split()[0]) == default


def test_the_readmes_main_flags_exist_with_their_defaults():
    rows = _readme_flag_rows()
    assert len(rows) >= 10
    for names, defaults in rows:
        assert len(names) == len(defaults), (names, defaults)
        for name, cell in zip(names, defaults):
            assert name in FIELDS, f"README names --{name}, which is not a flag"
            assert _states(cell, FIELDS[name].default), f"README: --{name} defaults to {FIELDS[name].default!r}, not {cell!r}"


@pytest.mark.parametrize("cell, default, states", [("1000", 1000, True), ("3e-3", 3e-3, True), ("0.5", 0.1, False),
                                                   ("`mi`", "mi", True), ("`dss`", "mi", False), ("false", False, True),
                                                   ("true", False, False), ("0 (unset)", 0, True)])
def test_a_readme_default_is_read_as_written(cell, default, states):
    assert _states(cell, default) is states
