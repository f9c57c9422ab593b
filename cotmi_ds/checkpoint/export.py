"""Export as a Hugging Face model (config, safetensors weights, tokenizer) from a saved checkpoint:
`cotmi export`, and the run's own ``model/`` (from its final checkpoint, so both are the same).

What an export holds: the weights training updates, in fp32, and a model card (README.md, card.py). In a bf16 run those are the
optimizer's fp32 master weights, at every ZeRO stage (the bf16 weights the forward pass used are
their rounding); in an fp32 run, the weights. ``config.json`` says so under ``cotmi_export``."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from cotmi_ds.checkpoint.card import CARD, model_card
from cotmi_ds.checkpoint.checkpointer import quiet
from cotmi_ds.checkpoint.layout import PARTIAL, T5_CONFIG, TOKENIZER, CheckpointInfo, read_checkpoint, resolve
from cotmi_ds.checkpoint.zero0 import MODEL_STATES, bf16_masters, distinct_parameters
from cotmi_ds.distributed import DistEnv, barrier, settle_ds_accelerator
from cotmi_ds.errors import UsageError
from cotmi_ds.files import read_json, write_problem


def _zero0_masters(states: dict, where: Path) -> dict[str, torch.Tensor] | None:
    """ZeRO-0 in bf16 keeps DeepSpeed's bf16 optimizer, with its fp32 master weights, inside the
    model-states file, in the order of the module's parameters (zero0.py reads them). None in an
    fp32 run (no masters)."""
    masters = bf16_masters(states, f"export: {where}")
    if masters is None:
        return None
    return {name: master.view(tensor.shape) for (names, tensor), master in zip(distinct_parameters(states), masters)
            for name in names}


def consolidated_state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The full fp32 weights of the student, whatever the ZeRO stage, precision and world size that
    wrote them: the fp32 master weights wherever the optimizer has them, else the module's."""
    optim_shards = list(info.path.glob("*zero_pp_rank_*_optim_states.pt"))
    if optim_shards:  # ZeRO 1-3: the fp32 master copy, reassembled from the shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with quiet():
            state = get_fp32_state_dict_from_zero_checkpoint(str(info.path.parent), tag=info.path.name)
    else:  # ZeRO-0: the masters inside the model-states file (bf16), or the module's fp32 weights
        states = torch.load(info.path / MODEL_STATES, map_location="cpu", weights_only=True)
        state = _zero0_masters(states, info.path) or states["module"]
    return {k.removeprefix("t5."): v.float() for k, v in state.items()}


def _write(info: CheckpointInfo, out: Path, results: dict | None) -> None:
    """The Hugging Face folder of one checkpoint (fp32 weights, config, tokenizer, model card);
    ``results``: the run's results.json when this is its final checkpoint."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cotmi_ds.model.family import config_from_dict

    hf_logging.disable_progress_bar()
    config = config_from_dict(read_json(info.path / T5_CONFIG))
    config.dtype = torch.float32
    precision = info.meta.get("precision", "fp32")
    config.cotmi_export = {
        "weights": "fp32 master weights of a bf16 run" if precision == "bf16" else "fp32 weights",
        "precision": precision, "step": info.step, "zero_stage": info.zero_stage}
    t5 = t5_from_state(config, consolidated_state_dict(info), where=info.path)
    tokenizer = AutoTokenizer.from_pretrained(info.path / TOKENIZER)
    card = model_card(info.path.parent.parent.name, {**info.meta, "step": info.step}, results)
    _save_hf(t5.eval(), tokenizer, out, card)


def t5_from_state(config, state: dict[str, torch.Tensor], where: Path):
    """A T5 (or mT5) with exactly these weights. transformers >= 5 builds every T5 with its LM head tied to the
    embeddings, while T5 v1.1 checkpoints (google/t5-v1_1-*, Flan-T5) have a head of their own:
    when the state holds two different tensors, the head is untied before loading (else one of the
    two would overwrite the other)."""
    from cotmi_ds.model.family import student_class

    t5 = student_class(config)(config)
    head, shared = state.get("lm_head.weight"), state.get("shared.weight")
    untied = head is not None and shared is not None and not torch.equal(head, shared)
    if untied:
        t5.lm_head.weight = torch.nn.Parameter(torch.empty_like(head))
    missing, unexpected = t5.load_state_dict(state, strict=False)
    tied = set(getattr(t5, "_tied_weights_keys", None) or [])  # aliases of another weight: not saved twice
    if unexpected or set(missing) - tied:
        raise UsageError(f"export: {where}: its weights do not fit its own t5_config.json "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if not untied:
        t5.tie_weights()
    return t5


def _save_hf(t5, tokenizer, out_dir: Path, card=None) -> None:
    """Write ``out_dir`` complete or not at all: into ``<out_dir>.partial`` (which the caller made
    sure is ours to use), then renamed into place, replacing an older ``out_dir``."""
    tmp, aside = (out_dir.with_name(out_dir.name + suffix) for suffix in (PARTIAL, ".replaced" + PARTIAL))
    tmp.mkdir(parents=True)  # fails if it exists: never write into (or remove) a folder not ours
    try:
        t5.save_pretrained(tmp)  # safetensors; handles tied weights
        tokenizer.save_pretrained(tmp)
        if card is not None:
            card.save(tmp / CARD)
        if out_dir.exists():
            out_dir.rename(aside)
        tmp.rename(out_dir)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf_model(checkpoint: Path, out_dir: Path, env: DistEnv, results: dict) -> None:
    """The run's ``model/``, from its final checkpoint, its card showing ``results`` (what results.json
    will hold). Rank 0 writes it; every rank calls this."""
    if env.is_main:
        shutil.rmtree(out_dir.with_name(out_dir.name + PARTIAL), ignore_errors=True)  # the run's own leftover
        _write(read_checkpoint(checkpoint, "export:"), out_dir, results)
    barrier(env)


def export_checkpoint(spec: str, out_dir: str) -> Path:
    """`cotmi export`: a checkpoint (or a run's latest) -> a Hugging Face folder. Nothing is written
    unless the checkpoint is complete and OUT_DIR is new or empty; the folder appears only when
    fully written."""
    settle_ds_accelerator()  # before anything imports DeepSpeed
    info = read_checkpoint(resolve(spec, "export:"), "export:")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"export: {out} already exists and is not empty; nothing was written")
    tmp = out.with_name(out.name + PARTIAL)
    if tmp.exists():  # not ours to delete: perhaps another export in progress
        raise UsageError(f"export: {tmp} already exists (an interrupted or running export?); remove it "
                         "and retry; nothing was written")
    try:
        _write(info, out, _final_results(info))
    except OSError as e:  # a read-only or full disk, no permission: nothing is left behind (_save_hf)
        raise UsageError(f"export: {write_problem(e, out)}; nothing was written") from None
    return info.path


def _final_results(info: CheckpointInfo) -> dict | None:
    """The run's results.json when the checkpoint is where the run ended (else None)."""
    path = info.path.parent.parent / "results.json"
    if not path.is_file():
        return None
    results = read_json(path)
    return results if isinstance(results, dict) and results.get("steps") == info.step else None
