"""The DeepSpeed configs shipped with the package (zero0..zero3, zero3_offload: JSON files next to this
module, so that an installed cotmi finds them by name), and reading a config by name or path.
Standard library only: `cotmi doctor` and `cotmi ds_config` read configs without importing torch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cotmi_ds.errors import UsageError
from cotmi_ds.files import read_json

DS_CONFIG_DIR = Path(__file__).resolve().parent


def ds_config_names() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


AUTO_DS_CONFIG = "auto"


def choose_ds_config(spec: str, world_size: int, saved_stage: int | None = None) -> str:
    """What ``--ds_config auto`` means. One process has nothing to partition, and ZeRO-1/2's flat fp32
    copies, gradient buckets and reduction hooks cost it time and memory (docs/benchmarks.md), so it
    runs ZeRO-0; several processes run ZeRO-2. A resumed run keeps the stage of its checkpoint
    (checkpoints load at their own stage only), so a run started alone continues at ZeRO-0 on any
    number of ranks, each holding what the lone rank held."""
    if spec != AUTO_DS_CONFIG:
        return spec
    if saved_stage is not None:
        return f"zero{saved_stage}"
    return "zero0" if world_size == 1 else "zero2"


def read_ds_config(spec: str) -> tuple[dict[str, Any], str]:
    """A name of a shipped config (e.g. 'zero3') or the path of a JSON file ('auto' is resolved to a
    name first: choose_ds_config)."""
    path = Path(spec)
    if not path.is_file():
        named = DS_CONFIG_DIR / f"{spec}.json"
        if not named.is_file():
            raise UsageError(f"--ds_config {spec}: no such file, and not a name in the shipped configs "
                             f"({', '.join(ds_config_names())}) nor auto")
        path = named
    data = read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    zero = data.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if not isinstance(zero, dict) or type(stage) is not int or stage not in (0, 1, 2, 3):
        raise UsageError(f"{path}: zero_optimization.stage must be one of 0, 1, 2, 3, got {stage!r}"
                         if isinstance(zero, dict) else f"{path}: zero_optimization must be an object")
    return data, str(path)
