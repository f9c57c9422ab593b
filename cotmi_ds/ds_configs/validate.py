"""A filled DeepSpeed config checked by DeepSpeed's own parser without starting an engine: what it
rejects, the top-level keys it would ignore silently, and what it accepts but the engine would then
fail on (a mistyped value, an optimizer or schedule it cannot build) become one line naming the key,
before anything is written."""
from __future__ import annotations

import copy
import difflib
from collections.abc import KeysView
from typing import Any

from cotmi_ds.ds_configs.fill import walk
from cotmi_ds.errors import UsageError, brief


class _SeenKeys(dict):
    """A dict that remembers which keys were asked for: the top-level keys DeepSpeed's own config
    parser reads are the ones it knows (it ignores the others silently)."""

    def __init__(self, data: dict, seen: set, defaults: dict | None = None):
        super().__init__(data)
        self.seen = seen
        self.defaults = {} if defaults is None else defaults  # key -> the default DeepSpeed reads it with

    def get(self, key, default=None):
        self.seen.add(key)
        self.defaults.setdefault(key, default)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _SeenKeysView(self)


class _SeenKeysView(KeysView):
    def __contains__(self, key):
        self._mapping.seen.add(key)
        return super().__contains__(key)


def _dotted(tree: dict, loc: tuple) -> str:
    """Where a pydantic error's location (relative to one section) sits in the whole config."""
    suffix = ".".join(str(part) for part in loc)
    paths = {".".join(p.split(".")[:i]) for p, _ in walk(tree) for i in range(1, p.count(".") + 2)}
    matches = sorted(p for p in paths if p == suffix or p.endswith("." + suffix))
    return matches[0] if matches else suffix


def validate_ds_config(ds: dict[str, Any], where: str) -> None:
    """Run DeepSpeed's own config parser on a filled config, without starting an engine, and turn
    what it rejects into one line naming the key: unknown top-level keys (which DeepSpeed would
    ignore silently), unknown or mistyped keys inside its sections (its pydantic models forbid them).
    Then what the parser lets through but the engine fails on: top-level values of another type than
    the default DeepSpeed reads them with, and the optimizer and schedule, built as the engine builds
    them on a stand-in parameter."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = copy.deepcopy(ds)
    probe.pop("train_batch_size", None)  # checked against the flags (fill.py); DeepSpeed would recheck
    seen: set = set()                    # it against whatever world size this process sees
    defaults: dict = {}
    try:
        DeepSpeedConfig(_SeenKeys(probe, seen, defaults))
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = _dotted(ds, err["loc"])
        what = "unknown key" if err["type"] == "extra_forbidden" else f"bad value {err.get('input')!r}"
        raise UsageError(f"{where}: {key}: {what} ({err['msg']})") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{where}: rejected by DeepSpeed: {reason}") from None
    known = seen | _READ_OUTSIDE_CONFIG
    unknown = [k for k in ds if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"{where}: unknown key {unknown[0]!r}{hint}; DeepSpeed "
                         f"{_deepspeed_version()} would ignore it")
    _check_scalar_types(ds, where, defaults)
    _check_optimizer_and_schedule(ds, where)


# Top-level values DeepSpeed reads with a default of None, and what the engine does with them.
_TYPES_WITHOUT_DEFAULT = {"steps_per_print": int, "vocabulary_size": int, "communication_data_type": str,
                          "log_level": str}
_POSITIVE = ("steps_per_print",)  # the engine divides by it
_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
         list: "a list"}


def _check_scalar_types(ds: dict[str, Any], where: str, defaults: dict[str, Any]) -> None:
    """A top-level value must have the type of the default DeepSpeed reads it with (an int where it
    defaults to 10, a bool where to false, an object where to {}): its parser does not look, its
    engine fails later (a string steps_per_print at the first step)."""
    for key, value in ds.items():
        default = defaults.get(key)
        kind = _TYPES_WITHOUT_DEFAULT.get(key) if default is None else type(default)
        if value is None or kind not in _KIND:
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
              else isinstance(value, int) and not isinstance(value, bool) if kind is int
              else isinstance(value, kind))
        if not ok:
            raise UsageError(f"{where}: {key}: expected {_KIND[kind]}, got {brief(value)}")
        if key in _POSITIVE and value <= 0:
            raise UsageError(f"{where}: {key}: expected a positive integer, got {brief(value)}")


def _check_optimizer_and_schedule(ds: dict[str, Any], where: str) -> None:
    """The optimizer's type as DeepSpeed resolves it (its own names, else torch.optim's classes, which
    are then built here from "params" on a stand-in parameter), and the schedule built as the engine
    builds it (DeepSpeed's lr_schedules, else torch's) on a stand-in optimizer: what either raises is
    one line naming the section."""
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    stand_in = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        name, params = optimizer["type"], optimizer.get("params", {})
        if "max_grad_norm" in params:
            raise UsageError(f"{where}: optimizer.params.max_grad_norm: DeepSpeed refuses it; gradient_clipping "
                             "(--grad_clip) clips the gradients")
        if name.lower() not in DEEPSPEED_OPTIMIZERS:
            kind = getattr(torch.optim, name, None)
            if not (isinstance(kind, type) and issubclass(kind, torch.optim.Optimizer)):
                raise UsageError(f"{where}: optimizer.type {brief(name)}: not an optimizer DeepSpeed knows "
                                 f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a class of torch.optim")
            _build(lambda: kind(stand_in, **params), where, "optimizer.params", f"torch.optim.{name}")
    scheduler = ds.get("scheduler")
    if scheduler is not None:
        name, params = scheduler["type"], scheduler.get("params", {})
        kind = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
        if not isinstance(kind, type):
            raise UsageError(f"{where}: scheduler.type {brief(name)}: not a schedule DeepSpeed knows "
                             f"({', '.join(lr_schedules.VALID_LR_SCHEDULES)}) nor a class of torch.optim.lr_scheduler")
        lr = (optimizer or {}).get("params", {}).get("lr", 1e-3)
        opt = torch.optim.SGD(stand_in, lr=lr if isinstance(lr, (int, float)) else 1e-3)
        _build(lambda: kind(opt, **params), where, "scheduler.params", name)


def _build(make, where: str, key: str, what: str) -> None:
    try:
        make()
    except (TypeError, ValueError, AssertionError, KeyError, ZeroDivisionError, AttributeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{where}: {key}: {what} cannot be built from them: {reason}") from None


# Top-level keys DeepSpeed reads outside DeepSpeedConfig's parser.
_READ_OUTSIDE_CONFIG = {"sequence_parallel_size"}


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
