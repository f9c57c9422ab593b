"""A filled DeepSpeed config checked by DeepSpeed's own parser without starting an engine: what it
rejects, and the top-level keys it would ignore silently, become one line naming the key."""
from __future__ import annotations

import copy
import difflib
from collections.abc import KeysView
from typing import Any

from cotmi_ds.ds_configs.fill import walk
from cotmi_ds.errors import UsageError


class _SeenKeys(dict):
    """A dict that remembers which keys were asked for: the top-level keys DeepSpeed's own config
    parser reads are the ones it knows (it ignores the others silently)."""

    def __init__(self, data: dict, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.add(key)
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
    ignore silently), unknown or mistyped keys inside its sections (its pydantic models forbid them)."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = copy.deepcopy(ds)
    probe.pop("train_batch_size", None)  # checked against the flags (fill.py); DeepSpeed would recheck
    seen: set = set()                    # it against whatever world size this process sees
    try:
        DeepSpeedConfig(_SeenKeys(probe, seen))
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


# Top-level keys DeepSpeed reads outside DeepSpeedConfig's parser.
_READ_OUTSIDE_CONFIG = {"sequence_parallel_size"}


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
