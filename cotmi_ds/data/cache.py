"""The on-disk cache of tokenized splits (and of sentencepiece models trained on the fly).

An entry's name is a hash of everything that changes its content: the data files (path and the
SHA-256 of their bytes), the options that select rows (dataset, label_type, subsample, and the seed when
it matters), the tokenizer's identity (the bytes of a sentencepiece model trained on the fly, else
datasets' fingerprint of the tokenizer object), the lengths, prefixes and the mode's encoding, and
the source of the code that builds the entry. A changed input gives a new name, never a stale hit.

Entries are written to a temporary folder and renamed into place, so a reader sees a whole entry
or none; ``meta.json`` is written last. The splits are Arrow files written by ``Dataset.map`` and
memory-mapped on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

FORMAT = 1  # bump when the layout of an entry changes
_PACKAGE = Path(__file__).resolve().parents[1]
# The code whose output is cached: an edit to any of these makes new keys.
_CODE = ["data/datasets.py", "data/own.py", "data/splits.py", "data/synthetic.py", "data/encode.py",
         "data/tokenizer.py", "modes.py", "data/arith.py"]


def code_fingerprint() -> str:
    h = hashlib.sha256()
    for rel in _CODE:
        h.update(rel.encode() + b"\0" + (_PACKAGE / rel).read_bytes())
    return h.hexdigest()


def files_fingerprint(paths: list[Path]) -> list[list]:
    """Path and SHA-256 of each file's bytes: an edited file gets a new key whatever its size and
    modification time say (a copy that keeps the time, an edit within the same second)."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append([str(p.resolve()), h.hexdigest()])
    return out


def digest(parts: dict) -> str:
    payload = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """Beside datasets' own cache (HF_DATASETS_CACHE / HF_HOME move it)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "cotmi_ds"


class DataCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    # --- sentencepiece models ---------------------------------------------------------------
    def _spm_path(self, key: str) -> Path:
        return self.root / "tokenizers" / f"{key}.model"

    def load_tokenizer_model(self, key: str) -> bytes | None:
        path = self._spm_path(key)
        return path.read_bytes() if path.is_file() else None

    def save_tokenizer_model(self, key: str, model: bytes) -> None:
        path = self._spm_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(model)
        tmp.replace(path)

    # --- tokenized splits -------------------------------------------------------------------
    def splits_dir(self, key: str) -> Path:
        return self.root / "splits" / key

    def has_splits(self, key: str) -> bool:
        return (self.splits_dir(key) / "meta.json").is_file()

    def load_splits(self, key: str):
        """(splits, meta) of a complete entry, or None."""
        from datasets import Dataset

        entry = self.splits_dir(key)
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        splits = {name: Dataset.from_file(str(entry / f"{name}.arrow")) for name in meta["splits"]}
        return splits, meta

    def write_splits(self, key: str, build: Callable[[Path], dict]) -> None:
        """``build(folder)`` writes ``<split>.arrow`` files into ``folder`` and returns the meta
        (with ``"splits"``: their names); the folder becomes the entry only once complete."""
        final = self.splits_dir(key)
        if self.has_splits(key):
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            try:
                tmp.rename(final)
            except OSError:  # another process completed the same entry first: keep theirs
                if not (final / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
