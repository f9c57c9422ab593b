"""The Slurm batch scripts shipped inside the package (cotmi_ds/cluster/templates/*.sbatch), found by
name so that an installed cotmi needs no checkout: `cotmi slurm template multinode > job.sbatch`."""
from __future__ import annotations

from pathlib import Path

from cotmi_ds.errors import UsageError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.sbatch"))


def template_path(name: str, what: str = "template") -> Path:
    """A shipped template by name (`multinode`, `singlenode`), or the path of a script of your own."""
    path = Path(name)
    if path.is_file():
        return path
    named = TEMPLATE_DIR / f"{name}.sbatch"
    if not named.is_file():
        raise UsageError(f"{what} {name}: no such file, and not a shipped template ({', '.join(template_names())})")
    return named
