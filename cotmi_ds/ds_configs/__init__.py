"""The DeepSpeed config: the one place a config is chosen, read, filled and validated.

``choose_ds_config`` is the entry point of the trainer, `cotmi doctor` and the benchmarks: it turns
``--ds_config`` (a shipped name, a JSON file or ``auto``) into a ``DsConfig``, which says which
compiled ops it needs (ops.py) and fills itself from the flags (fill.py), checked by DeepSpeed's own
parser (validate.py). ``--precision`` is resolved in precision.py. The shipped configs (zero0..zero3,
zero3_offload) are JSON files next to this module, so that an installed cotmi finds them by name.

This module imports the standard library only: `cotmi train`'s early checks, `cotmi doctor` and
`cotmi ds_config` read configs without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotmi_ds.errors import UsageError, brief
from cotmi_ds.files import read_json

if TYPE_CHECKING:
    from cotmi_ds.config import TrainConfig
    from cotmi_ds.distributed import DistEnv

DS_CONFIG_DIR = Path(__file__).resolve().parent
AUTO_DS_CONFIG = "auto"


def ds_config_names() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def auto_choice(spec: str, world_size: int, saved_stage: int | None = None) -> str:
    """What ``--ds_config auto`` means. One process has nothing to partition, and ZeRO-1/2's flat fp32
    copies, gradient buckets and reduction hooks cost it time and memory (docs/benchmarks.md), so it
    runs ZeRO-0; several processes run ZeRO-2. A resumed run keeps the stage of its checkpoint
    (checkpoints load at their own stage only), so a run started alone continues at ZeRO-0 on any
    number of ranks, each holding what the lone rank held. Any other ``spec`` is returned as given."""
    if spec != AUTO_DS_CONFIG:
        return spec
    if saved_stage is not None:
        return f"zero{saved_stage}"
    return "zero0" if world_size == 1 else "zero2"


def read_ds_config(spec: str) -> tuple[dict[str, Any], str]:
    """A name of a shipped config (e.g. 'zero3') or the path of a JSON file, and where it was read
    ('auto' is resolved to a name first: auto_choice)."""
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
        raise UsageError(f"{path}: zero_optimization.stage must be one of 0, 1, 2, 3, got {brief(stage)}"
                         if isinstance(zero, dict) else f"{path}: zero_optimization must be an object")
    for section in ("optimizer", "scheduler"):  # read by DeepSpeed's parser without looking
        value = data.get(section, {})
        if not isinstance(value, dict) or (section in data and not isinstance(value.get("type"), str)):
            raise UsageError(f"{path}: {section}: expected an object with a \"type\" (and \"params\"), "
                             f"got {brief(value)}")
        if not isinstance(value.get("params", {}), dict):
            raise UsageError(f"{path}: {section}.params: expected an object of keyword arguments, got "
                             f"{brief(value['params'])}")
    return data, str(path)


def zero_stage(ds_config: dict[str, Any]) -> int:
    zero = ds_config.get("zero_optimization")
    return int((zero.get("stage") if isinstance(zero, dict) else None) or 0)


@dataclass(frozen=True)
class DsConfig:
    """A DeepSpeed config as read (``raw``, "auto" values and all) from ``where``."""
    name: str   # the shipped name or the path --ds_config chose
    raw: dict[str, Any]
    where: str  # the file it was read from, named in every error about it

    @property
    def stage(self) -> int:
        return zero_stage(self.raw)

    def check_ops(self, device_type: str) -> list[str]:
        """Before start-up: a compiled op this config needs that cannot be built here ends the run
        (UsageError); warnings about ops that will be compiled at start-up are returned."""
        from cotmi_ds.ds_configs.ops import check_ops

        return check_ops(self.raw, self.where, device_type)

    def fill(self, cfg: TrainConfig, env: DistEnv, precision: str, hidden_size: int,
             load_universal: bool = False) -> dict[str, Any]:
        """The config DeepSpeed gets: every "auto" filled from the flags, conflicts refused, then
        checked by DeepSpeed's own parser. ``precision``: resolved (precision.resolve_precision);
        ``hidden_size``: the student's d_model (bucket sizes); ``load_universal``: a resume on another
        world size."""
        from cotmi_ds.ds_configs.fill import fill_ds_config
        from cotmi_ds.ds_configs.validate import validate_ds_config

        ds = fill_ds_config(self.raw, self.where, cfg, env, precision, hidden_size, load_universal)
        validate_ds_config(ds, self.where)
        return ds


def choose_ds_config(spec: str, world_size: int, saved_stage: int | None = None) -> DsConfig:
    """``--ds_config`` (a shipped name, a file, or 'auto' for ``world_size`` ranks, keeping a resumed
    checkpoint's ``saved_stage``), read and checked for a valid ZeRO stage."""
    name = auto_choice(spec, world_size, saved_stage)
    raw, where = read_ds_config(name)
    return DsConfig(name, raw, where)
