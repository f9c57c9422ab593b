"""A model folder's weight files: which names hold weights, and whether each safetensors file can be
read (its header lists every tensor and where it lies; a truncated or overwritten file fails to
open), checked before anything heavy loads them. Standard library and safetensors only: the CLI
checks a --model folder before it imports torch."""
from __future__ import annotations

from pathlib import Path

from cotmi_ds.errors import UsageError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weight_files(folder: Path, flag: str) -> None:
    """Every ``*.safetensors`` file of ``folder`` opens, or one line naming the damaged file."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "np"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file cannot be read either way
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"{flag} {folder}: {path.name} is damaged ({reason}); copy or download it "
                             "again") from None
