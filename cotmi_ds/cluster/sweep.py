"""`cotmi sweep`: a grid of runs (datasets x students x modes x alpha/beta x subsample x seeds) as one
Slurm job array over the shipped singlenode.sbatch template, one run directory per cell, finished
cells skipped.

The grid file (YAML or JSON):

    fixed:                 # flags of every cell (any `cotmi train` flag; `config` picks a preset/file)
      config: paper
      max_steps: 10000
    grid:                  # every combination of these becomes one cell
      dataset: [cqa, svamp]
      model: [google/t5-v1_1-small, google/t5-v1_1-base]
      mode: [dss, mi]
      seed: [0, 1, 2]

The sweep directory holds ``sweep.yaml`` (the grid), ``cells/<i>.args`` and ``cells/<i>.rundir``
(what array task i runs), ``runs/<cell name>/`` (the cells' run directories) and ``logs/``.
"""
from __future__ import annotations

import itertools
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from cotmi_ds.cluster.templates import template_path
from cotmi_ds.config import load_config, read_config_file
from cotmi_ds.errors import UsageError
from cotmi_ds.files import write_text_atomic


def read_grid(path: str) -> tuple[dict[str, Any], dict[str, list]]:
    if not Path(path).expanduser().is_file():
        raise UsageError(f"GRID {path}: no such file (a YAML/JSON file of fixed: and grid:, as in docs/slurm.md)")
    data, where = read_config_file(str(Path(path).expanduser()))
    unknown = set(data) - {"fixed", "grid"}
    if unknown:
        raise UsageError(f"{where}: unknown key {sorted(unknown)[0]!r}; a grid file has 'fixed' and 'grid'")
    fixed, grid = data.get("fixed") or {}, data.get("grid") or {}
    if not isinstance(fixed, dict) or not isinstance(grid, dict) or not grid:
        raise UsageError(f"{where}: 'fixed' must be a mapping and 'grid' a non-empty mapping of flag: [values]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where}: grid.{key} must be a non-empty list of values")
        if key in fixed:
            raise UsageError(f"{where}: {key!r} is both fixed and in the grid")
    return fixed, grid


def cell_name(cell: dict[str, Any]) -> str:
    """A readable, filesystem-safe name from the grid values, e.g. dataset-cqa_mode-mi_seed-0."""
    return "_".join(f"{k}-{re.sub(r'[^A-Za-z0-9.]+', '-', str(v)).strip('-')}" for k, v in cell.items())


def expand(fixed: dict[str, Any], grid: dict[str, list], where: str) -> list[dict[str, Any]]:
    """Every combination, in a fixed order, each checked like `cotmi train` checks its flags."""
    keys = list(grid)
    cells = []
    for values in itertools.product(*(grid[k] for k in keys)):
        cell = dict(zip(keys, values))
        flags = {**fixed, **cell}
        # Each flag and value becomes one line of the cell's argument file: a line break in a value
        # would smuggle in flags of its own (such as --output_dir).
        broken = next((k for k, v in flags.items() if any(c in f"{k}{v}" for c in "\n\r\x00")), None)
        if broken is not None:
            raise UsageError(f"{where}: {broken}: a line break or NUL in a name or value is not allowed")
        preset = flags.pop("config", None)
        if "output_dir" in flags or "resume" in flags:
            raise UsageError(f"{where}: output_dir and resume are set by the sweep, per cell")
        try:
            load_config(preset, **flags)
        except UsageError as e:
            raise UsageError(f"{where}: cell {cell_name(cell)}: {e}") from None
        cells.append(cell)
    names = [cell_name(c) for c in cells]
    if len(set(names)) != len(names):
        raise UsageError(f"{where}: two cells share a name; make the grid values distinct")
    return cells


def _words(flags: dict[str, Any]) -> list[str]:
    words = []
    for key, value in flags.items():
        words += [f"--{key}", "null" if value is None else str(value)]
    return words


def finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.is_file() and '"completed"' in status.read_text()


def plan_sweep(grid_file: str, out: str) -> tuple[Path, list[int], int]:
    """Write the sweep directory; return it, the array indices still to run, and the cell count."""
    fixed, grid = read_grid(grid_file)
    cells = expand(fixed, grid, grid_file)
    root = Path(out).resolve()
    spec = yaml.safe_dump({"fixed": fixed, "grid": grid}, sort_keys=False)
    if (root / "sweep.yaml").exists() and (root / "sweep.yaml").read_text() != spec:
        raise UsageError(f"--out {out}: holds a sweep of a different grid ({root / 'sweep.yaml'}); "
                         "choose another directory")
    if root.exists() and not (root / "sweep.yaml").exists() and any(root.iterdir()):
        raise UsageError(f"--out {out}: exists and is not a sweep directory")
    (root / "cells").mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    write_text_atomic(root / "sweep.yaml", spec)
    pending = []
    for i, cell in enumerate(cells):
        run_dir = root / "runs" / cell_name(cell)
        flags = {**fixed, **cell}
        preset = flags.pop("config", None)
        words = (["--config", str(preset)] if preset is not None else []) + _words(flags)
        write_text_atomic(root / "cells" / f"{i}.args", "\n".join(words) + "\n")
        write_text_atomic(root / "cells" / f"{i}.rundir", f"{run_dir}\n")
        if not finished(run_dir):
            pending.append(i)
    return root, pending, len(cells)


def array_spec(indices: list[int], max_parallel: int) -> str:
    """Compact Slurm array ranges: [0, 1, 2, 5] -> '0-2,5' (with '%N' to cap parallel tasks)."""
    parts, start = [], None
    for i, idx in enumerate(indices):
        if start is None:
            start = idx
        if i + 1 == len(indices) or indices[i + 1] != idx + 1:
            parts.append(str(start) if start == idx else f"{start}-{idx}")
            start = None
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def sbatch_command(root: Path, pending: list[int], sbatch_args: str, max_parallel: int,
                   template: Path) -> list[str]:
    return ["sbatch", "--parsable", f"--array={array_spec(pending, max_parallel)}", "--job-name=cotmi-sweep",
            f"--output={root / 'logs' / '%A_%a.out'}", f"--export=ALL,COTMI_SWEEP_DIR={root}",
            *shlex.split(sbatch_args), str(template)]


def run_sweep(grid: str, out: str, submit: bool, sbatch_args: str, max_parallel: int,
              template: str | None) -> str | None:
    tpl = template_path(template or "singlenode", "--template")
    if max_parallel < 0:
        raise UsageError(f"--max_parallel must be >= 0, got {max_parallel}")
    root, pending, total = plan_sweep(grid, out)
    done = total - len(pending)
    if not pending:
        print(f"all {total} cells of {root} are finished; nothing to submit. "
              f"Table: cotmi report {root}/runs/*")
        return None
    cmd = sbatch_command(root, pending, sbatch_args, max_parallel, tpl)
    print(f"{total} cells, {done} finished, {len(pending)} to run: {' '.join(shlex.quote(c) for c in cmd)}")
    if not submit:
        print("(not submitted: pass --submit to run it)")
        return None
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"sbatch failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job array {job}; logs in {root / 'logs'}; when done: cotmi report {root}/runs/*")
    return job
