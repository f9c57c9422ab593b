"""Checkpoints on disk: names, the ``latest`` pointer, our metadata (JSON), completeness checks,
rotation, and what a ``--resume`` or ``cotmi export`` argument points at. No DeepSpeed here.

    <run>/checkpoints/
      latest             "step-N": replaced atomically, only after every rank finished writing step-N
      step-N/            DeepSpeed's files, t5_config.json, tokenizer/, rank-R.json (RNG state of
                         rank R), cotmi_checkpoint.json (written last: step, world size, data position,
                         the size and SHA-256 of every file above)
      step-N.partial/    a save in progress or interrupted: never loaded, removed by the next save
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotmi_ds.errors import UsageError, brief
from cotmi_ds.evaluation.results import EVALUATION
from cotmi_ds.files import fsync_dir, read_json, read_text, write_text_atomic
from cotmi_ds.schema import Check, MapOf, Optional, at_least, problem

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "cotmi_checkpoint.json"
FORMAT = "cotmi-checkpoint/1"
SHA256 = "sha256"  # metadata field: file -> SHA-256 (absent in checkpoints of earlier versions)
PARTIAL = ".partial"
UNIVERSAL = "universal"
T5_CONFIG = "t5_config.json"
TOKENIZER = "tokenizer"
_STEP = re.compile(r"step-(\d+)")


def tag(step: int) -> str:
    return f"step-{step}"


def step_of(name: str) -> int | None:
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def rank_file(rank: int) -> str:
    return f"rank-{rank}.json"


# --- the metadata's schema: what a checkpoint must hold before anything reads it ------------------
SHA256_HEX = Check(str, lambda v: re.fullmatch("[0-9a-f]{64}", v) is not None, "a SHA-256 (64 hex digits)")
MODEL = {"name": str, "parameters": at_least(0), "summary": str, "shapes_sha256": SHA256_HEX,
         "vocab_sha256": SHA256_HEX}
# The data position (data/sampler.py BatchOrder.state_dict; "global_batch" in older checkpoints).
ORDER = {"epoch": at_least(0), "batch_in_epoch": at_least(0), "rows_in_epoch": Optional(at_least(0)),
         "layout": Optional([int]), "global_batch": Optional(at_least(1)),
         "group_rows": Optional(at_least(0))}  # length grouping's mega-batch rows (0: none)
# What a resume restores besides the engine (training/state.py TrainState.state_dict).
TRAINER = {"order": Check(ORDER, lambda o: "rows_in_epoch" in o or "global_batch" in o,
                          "rows_in_epoch (the rows of the epoch already seen)"),
           "evaluations": [EVALUATION], "skipped_micro_batches": at_least(0),
           "skipped_updates": Optional(at_least(0)), "train_seconds": float}
META_SCHEMA = {
    "step": at_least(0), "world_size": at_least(1), "zero_stage": (0, 1, 2, 3), "precision": Optional(str),
    "files": MapOf(at_least(0)),
    # Present means checked: an empty or partial list of sums is an error, never "no sums".
    SHA256: Optional(Check(MapOf(SHA256_HEX), bool, "a SHA-256 for every file")),
    "model": Optional(MODEL), "trainer": Optional(TRAINER), "config": Optional(dict),
    "engine": Optional(MapOf(int)), "saved_at": Optional(str), "versions": Optional(MapOf(str)),
}
# What a resume needs on top (older checkpoints without these can still be exported).
RESUME_FIELDS = ("model", "trainer")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    @property
    def zero_stage(self) -> int:
        return int(self.meta["zero_stage"])


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` (relative name -> bytes), our metadata file excluded."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != META and UNIVERSAL not in p.relative_to(folder).parts}


_OWNER = re.compile(r"(?:zero_pp_rank_|rank-)(\d+)[_.]")


def share_of(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """The files this rank hashes and flushes during a save: its own shards (``zero_pp_rank_R_*``,
    ``rank-R.json``: still in its page cache) and a size-balanced share of the others."""
    load = [0] * world_size
    owner: dict[str, int] = {}
    for name, size in sizes.items():
        m = _OWNER.match(Path(name).name)
        if m and int(m.group(1)) < world_size:
            owner[name] = int(m.group(1))
            load[owner[name]] += size
    for name in sorted((n for n in sizes if n not in owner), key=lambda n: (-sizes[n], n)):
        owner[name] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner[name]] += sizes[name]
    return sorted(n for n, r in owner.items() if r == rank)


def sha256_and_fsync(folder: Path, names: list[str]) -> dict[str, str]:
    """Hash each file (right after it was written, so mostly from the page cache) and flush it to
    disk in the same pass."""
    digests = {}
    for name in names:
        with open(folder / name, "rb") as f:
            digests[name] = _sha256(f)
            os.fsync(f.fileno())
    return digests


def _sha256(f) -> str:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_latest(root: Path, name: str) -> None:
    write_text_atomic(root / LATEST, name, durable=True)


def read_latest(root: Path) -> str | None:
    """The checkpoint ``latest`` names (None when there is no ``latest``), checked to be a step-N
    name: the pointer never leads outside its folder."""
    file = root / LATEST
    if not file.is_file():
        return None
    name = read_text(file).strip()
    if step_of(name) is None:
        raise UsageError(f"{file}: names {brief(name)}, not a checkpoint (step-N); point it at a step-N "
                         f"folder beside it, or remove it to start over")
    return name


def unpublish(root: Path, name: str) -> None:
    """Before the published checkpoint ``name`` is moved aside (a step saved again after resuming
    an earlier one), point ``latest`` at the newest older checkpoint, or remove it when there is
    none, so that ``latest`` never names a folder that is gone."""
    if read_latest(root) != name:
        return
    own = step_of(name)
    older = sorted((s, p.name) for p in root.iterdir()
                   if p.is_dir() and (s := step_of(p.name)) is not None and own is not None and s < own)
    if older:
        write_latest(root, older[-1][1])
    else:
        (root / LATEST).unlink()
        fsync_dir(root)


def fsync_dirs(folder: Path) -> None:
    """Flush the directory entries below ``folder`` (the files were flushed by
    ``sha256_and_fsync``) before the checkpoint is published, so that ``latest`` never names data
    still in the page cache when the machine dies."""
    for p in sorted(folder.rglob("*"), reverse=True):
        if p.is_dir():
            fsync_dir(p)
    fsync_dir(folder)


def read_checkpoint(path: Path, what: str, verify: bool = True, requires: tuple[str, ...] = ()) -> CheckpointInfo:
    """A complete checkpoint, or one UsageError line naming what is wrong with it: its metadata is
    read bounded (files.read_json) and checked against META_SCHEMA, ``requires`` naming optional
    fields that must be present (RESUME_FIELDS for a resume). ``verify``: also compare every file with
    its SHA-256 in the metadata (reads the whole checkpoint; checkpoints written before the sums were
    recorded are checked by size only)."""
    if not path.exists():
        raise UsageError(f"{what} {path}: no such checkpoint directory")
    if not path.is_dir():
        raise UsageError(f"{what} {path}: not a directory")
    if path.name.endswith(PARTIAL):  # even with a metadata file: a save that was never published
        raise UsageError(f"{what} {path}: not a complete checkpoint (an unfinished save, never published; "
                         "the previous checkpoint is intact)")
    meta_file = path / META
    if not meta_file.is_file():
        if not any(path.iterdir()):
            reason = "the directory is empty"
        else:
            reason = f"no {META}: an interrupted save, or not a cotmi checkpoint"
        raise UsageError(f"{what} {path}: not a complete checkpoint ({reason})")
    try:
        meta = read_json(meta_file)
    except UsageError as e:
        raise UsageError(f"{what} {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{what} {meta_file}: not a {FORMAT} metadata file")
    schema = {**META_SCHEMA, **{key: META_SCHEMA[key].schema for key in requires}}
    wrong = problem(meta, schema)
    if wrong:
        raise UsageError(f"{what} {meta_file}: {wrong}; not a complete {FORMAT} metadata file")
    files = meta["files"]
    outside = next((name for name in files if not _inside(name)), None)
    if outside is not None:
        raise UsageError(f"{what} {meta_file}: files: {brief(outside)} lies outside the checkpoint")
    bad = [name for name, size in files.items()
           if not (path / name).is_file() or (path / name).stat().st_size != size]
    if bad:
        raise UsageError(f"{what} {path}: incomplete checkpoint: {bad[0]} is missing or truncated "
                         f"({len(bad)} of {len(files)} files)")
    sums = meta.get(SHA256)
    if sums is not None and set(sums) != set(files):
        raise UsageError(f"{what} {meta_file}: the files and {SHA256} fields list different files")
    if verify and sums:
        for name in sorted(files):
            with open(path / name, "rb") as f:
                if _sha256(f) != sums[name]:
                    raise UsageError(f"{what} {path}: corrupt checkpoint: {name} does not match the "
                                     f"SHA-256 recorded in {META}")
    return CheckpointInfo(path, meta)


def _inside(name: str) -> bool:
    """A file name the metadata may list: relative, and below the checkpoint folder."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and name != META


def resolve(spec: str | Path, what: str) -> Path:
    """A run directory, its checkpoints/ folder, or one checkpoint -> that checkpoint's folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(f"{what} {path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"{what} {path}: not a directory")
    if (path / META).exists() or step_of(path.name) is not None or path.name.endswith(PARTIAL):
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    latest = read_latest(root)
    if latest is not None:
        return root / latest
    if not any(path.iterdir()):
        raise UsageError(f"{what} {path}: the directory is empty")
    raise UsageError(f"{what} {path}: no checkpoint here (no {CHECKPOINTS}/{LATEST}); give a run "
                     f"directory, its {CHECKPOINTS}/ folder or one step-N checkpoint")


def latest_in_run(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names in a run directory, or None when it has no checkpoint yet."""
    latest = read_latest(run_dir / CHECKPOINTS)
    return None if latest is None else run_dir / CHECKPOINTS / latest


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run a checkpoint belongs to (<run>/checkpoints/step-N), if it sits in one."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` checkpoints (0 keeps all); never the one ``latest``
    names. Returns what was removed."""
    if keep_last <= 0:
        return []
    current = read_latest(root)
    done = sorted((step_of(p.name), p) for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None)
    removed = []
    for _, path in done[:-keep_last]:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_partials(root: Path) -> None:
    for p in root.glob(f"*{PARTIAL}"):
        shutil.rmtree(p, ignore_errors=True)


def model_identity(t5, tokenizer) -> dict[str, Any]:
    """What must match for a checkpoint to belong to this run's model: every parameter's name and
    shape, and the tokenizer's vocabulary (hashed), plus a readable summary for the error message."""
    # Under ZeRO-3 a parameter's local tensor is its partition: the full shape is ds_shape.
    shapes = ";".join(f"{n}:{tuple(getattr(p, 'ds_shape', p.shape))}" for n, p in t5.named_parameters())
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    c = t5.config
    return {
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in t5.parameters()),
        "summary": f"T5 d_model {c.d_model}, {c.num_layers}+{c.num_decoder_layers} layers, "
                   f"vocab {c.vocab_size}",
        "shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def check_same_model(info: CheckpointInfo, identity: dict[str, Any], what: str) -> None:
    saved = info.meta["model"]
    if saved["shapes_sha256"] != identity["shapes_sha256"]:
        raise UsageError(f"{what} {info.path}: from another model ({saved['summary']}, "
                         f"{saved['parameters']:,} parameters; this run builds {identity['summary']}, "
                         f"{identity['parameters']:,})")
    if saved["vocab_sha256"] != identity["vocab_sha256"]:
        raise UsageError(f"{what} {info.path}: trained with another tokenizer (vocabulary differs from "
                         "this run's); use the run's own --tokenizer/--dataset settings")
