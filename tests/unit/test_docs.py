"""The docs state the code's facts as the code does: the flag tables and the README's flags with their
defaults, one troubleshooting row per symptom."""
from __future__ import annotations

import ast
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
            default = FIELDS[name].default
            assert _states(cell, default), f"README: --{name} defaults to {default!r}, not {cell!r}"


@pytest.mark.parametrize("cell, default, states", [("1000", 1000, True), ("3e-3", 3e-3, True), ("0.5", 0.1, False),
                                                   ("`mi`", "mi", True), ("`dss`", "mi", False), ("false", False, True),
                                                   ("true", False, False), ("0 (unset)", 0, True)])
def test_a_readme_default_is_read_as_written(cell, default, states):
    assert _states(cell, default) is states


def _layout_entries() -> set[str]:
    """The paths docs/layout.md's tree names: an entry is a name at the start of a line (indented by
    two spaces a level), its description beside it."""
    text = (REPO / "docs" / "layout.md").read_text()
    block = text.split("```")[1]
    entries, folders = set(), []
    for line in block.splitlines():
        match = re.match(r"^( *)([\w.-]+/?)(\s|$)", line)
        if not match or len(match.group(1)) % 2 or len(match.group(1)) > 2 * len(folders):
            continue
        depth = len(match.group(1)) // 2
        folders = folders[:depth]
        path = "/".join(folders + [match.group(2).rstrip("/")])
        entries.add(path)
        if match.group(2).endswith("/"):
            folders.append(match.group(2).rstrip("/"))
    return entries


def _needs_a_line(path) -> bool:
    """A docstring-only __init__.py says what its folder's line says."""
    if path.name != "__init__.py":
        return True
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def test_layout_md_names_every_module_and_nothing_that_is_gone():
    entries = _layout_entries()
    files = [p for p in (REPO / "cotmi_ds").rglob("*.py") if "__pycache__" not in p.parts]
    files += [*(REPO / "benchmarks").glob("*.py"), *(REPO / "cotmi_ds" / "presets").glob("*.yaml")]
    files += [p for p in (REPO / "tests").iterdir() if p.suffix in (".py", ".sh") or
              (p.is_dir() and p.name != "__pycache__")]
    missing = sorted(str(p.relative_to(REPO)) for p in files
                     if (p.is_dir() or _needs_a_line(p)) and str(p.relative_to(REPO)) not in entries)
    assert missing == [], f"docs/layout.md does not name {missing}"
    gone = sorted(e for e in entries if not (REPO / e).exists())
    assert gone == [], f"docs/layout.md names {gone}, which do not exist"


def test_the_readmes_troubleshooting_table_names_each_symptom_once():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Troubleshooting"):text.index("## Documentation")]
    symptoms = [line.split("|")[1].strip().lower() for line in section.splitlines() if line.startswith("| ")]
    assert len(symptoms) >= 10
    assert [s for s in symptoms if symptoms.count(s) > 1] == [], "one row per symptom, with all its advice"
