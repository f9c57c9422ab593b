"""Rewrites the flag tables of docs/configuration.md from TrainConfig (cotmi_ds/config.py), where
every flag's default, accepted values and meaning are declared: `python docs/flag_tables.py`.
tests/unit/test_docs.py fails when the page and the config differ."""
from __future__ import annotations

import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "configuration.md"
BEGIN = "<!-- flag tables: generated from TrainConfig by docs/flag_tables.py; edit cotmi_ds/config.py -->"
END = "<!-- end of the flag tables -->"


def generated() -> str:
    from cotmi_ds.config import TrainConfig
    from cotmi_ds.flags import markdown_tables

    return f"{BEGIN}\n{markdown_tables(TrainConfig)}{END}"


def current(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


if __name__ == "__main__":
    sys.path.insert(0, str(PAGE.parent.parent))
    text = PAGE.read_text()
    PAGE.write_text(text.replace(current(text), generated()))
    print(f"rewrote the flag tables of {PAGE}")
