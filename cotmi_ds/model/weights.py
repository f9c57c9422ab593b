"""A model folder's weight files: which names hold weights, whether each safetensors file can be
read (checked before anything heavy loads them: standard library and safetensors only, so the CLI
checks a --model folder before it imports torch), and their tensors read lazily through safetensors'
``safe_open`` (``model.safetensors``, or the shards ``model.safetensors.index.json`` names): any
slice of a tensor is read without the rest of it.

At ZeRO-3 a pretrained student is loaded with it (``load_partitions``): the model is created already
partitioned (``zero.Init``, as for a scratch student) and each rank reads, for every parameter, the
contiguous run of elements its partition holds. No rank reads or gathers a whole weight, let alone
the whole model; transformers' own route reads the checkpoint on rank 0 and gathers every module on
every rank while it is filled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from cotmi_ds.errors import UsageError

if TYPE_CHECKING:
    import torch

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


SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> dict[str, Path] | None:
    """{tensor name: file} of a folder's safetensors weights; None when it has none (e.g. only
    ``pytorch_model.bin``)."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        return {name: folder / file for name, file in names.items()}
    single = folder / SAFETENSORS
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def holds_own_head(folder: Path) -> bool | None:
    """Whether the saved weights include an LM head of their own (T5 v1.1, Flan-T5, mT5 checkpoints);
    None when the folder has no safetensors weights to tell."""
    files = weight_files(folder)
    return None if files is None else "lm_head.weight" in files


class Reader:
    """Slices of the tensors in safetensors files, each read through its own ``safe_open``: the file
    is memory-mapped, and the pages a slice touched count in this process's resident memory for as
    long as the file stays open, so it is closed after every tensor. ``elements_read`` counts what
    was read, so that a test can hold a rank to its share."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.elements_read = files, 0

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def copy_range(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Elements [start, stop) of the tensor flattened in row-major order into ``out`` (1-D):
        the rows that hold them are read (at most two rows more than asked for), then cut."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            view = f.get_slice(name)
            shape = view.get_shape()
            row = 1
            for n in shape[1:]:
                row *= n
            first, last = start // row, -(-stop // row)
            read = view[first:last]
            self.elements_read += read.numel()
            out.copy_(read.reshape(-1)[start - first * row:stop - first * row])
            del read, view  # before the file closes: nothing may keep its mapping alive


def _checkpoint_keys(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Parameter, list[str]]]:
    """Each distinct parameter with every name it goes by (tied weights have several)."""
    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    for key, p in params.items():
        yield p, names[key]


def untie_head_if_saved(model: torch.nn.Module, files: dict[str, Path], make_head) -> None:
    """A checkpoint with its own ``lm_head.weight`` (T5 v1.1, Flan-T5, mT5) gets a head of its own:
    transformers builds these classes with the head tied to the embedding. ``make_head()`` returns
    the new module (created partitioned by the caller)."""
    if "lm_head.weight" in files and model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head = make_head()
        getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)  # never tied again


def load_partitions(model: torch.nn.Module, files: dict[str, Path], where: str) -> int:
    """Fill each ZeRO-3 parameter's local partition (``ds_tensor``) from the checkpoint: rank r of a
    parameter's group holds elements [r·s, (r+1)·s) of the flattened weight (s = the partition size,
    the last one zero-padded), as DeepSpeed partitions them. Returns the elements this rank read."""
    import deepspeed.comm as dist
    import torch

    missing = []
    reader = Reader(files)
    for p, names in _checkpoint_keys(model):
        key = next((n for n in names if n in files), None)
        if key is None:
            missing.append(names[0])
            continue
        if reader.shape(key) != tuple(p.ds_shape):
            raise UsageError(f"{where}: {key} has shape {reader.shape(key)} in the checkpoint, the model "
                             f"built from its config.json expects {tuple(p.ds_shape)}")
        local = p.ds_tensor
        size = local.ds_numel if hasattr(local, "ds_numel") else local.numel()
        start = size * dist.get_rank(group=p.ds_process_group)
        stop = min(start + size, p.ds_numel)
        with torch.no_grad():
            local.zero_()
            if start < stop:
                reader.copy_range(key, start, stop, local.narrow(0, 0, stop - start))
    if missing:
        raise UsageError(f"{where}: the checkpoint lacks {len(missing)} weight(s) of the model its "
                         f"config.json describes (e.g. {', '.join(missing[:3])})")
    return reader.elements_read
