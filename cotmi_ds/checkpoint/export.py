"""Export as a Hugging Face model (config, safetensors weights, tokenizer) from the live engine
at any ZeRO stage, or from a saved checkpoint (`cotmi export`)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from cotmi_ds.checkpoint.checkpointer import quiet
from cotmi_ds.checkpoint.layout import PARTIAL, T5_CONFIG, TOKENIZER, CheckpointInfo, read_checkpoint, resolve
from cotmi_ds.config import UsageError
from cotmi_ds.distributed import DistEnv, barrier


def _save_hf(t5, state_dict: dict | None, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Write ``out_dir`` complete or not at all: into ``<out_dir>.partial`` (which the caller made
    sure is ours to use), then renamed into place, replacing an older ``out_dir``."""
    tmp, aside = (out_dir.with_name(out_dir.name + suffix) for suffix in (PARTIAL, ".replaced" + PARTIAL))
    tmp.mkdir(parents=True)  # fails if it exists: never write into (or remove) a folder not ours
    try:
        t5.save_pretrained(tmp, state_dict=state_dict)  # safetensors; handles tied weights
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rename(aside)
        tmp.rename(out_dir)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf_model(engine, tokenizer: PreTrainedTokenizerBase, out_dir: Path, env: DistEnv,
                    zero3: bool) -> None:
    """Write ``out_dir`` (config, safetensors weights, tokenizer) loadable by from_pretrained, from
    the live engine.

    Under ZeRO-3 each rank holds a shard: the full state dict is gathered onto rank 0 first (a
    collective, so every rank calls this). The folder appears (or replaces an older one) only when
    complete: it is written as ``<out_dir>.partial`` and renamed."""
    t5 = engine.module.t5
    state = None
    if zero3:
        full = engine._zero3_consolidated_16bit_state_dict()
        if env.is_main:
            state = {k.removeprefix("t5."): v for k, v in full.items()}
    if env.is_main:
        shutil.rmtree(out_dir.with_name(out_dir.name + PARTIAL), ignore_errors=True)  # the run's own leftover
        _save_hf(t5, state, tokenizer, out_dir)
    barrier(env)


def consolidated_state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The full fp32 weights of the student, whatever the ZeRO stage and world size that wrote them."""
    optim_shards = list(info.path.glob("*zero_pp_rank_*_optim_states.pt"))
    if optim_shards:  # ZeRO 1-3 (and bf16 at stage 0): the fp32 master copy, reassembled
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with quiet():
            state = get_fp32_state_dict_from_zero_checkpoint(str(info.path.parent), tag=info.path.name)
    else:  # ZeRO-0 in fp32: the module's own weights
        state = torch.load(info.path / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)["module"]
    return {k.removeprefix("t5."): v for k, v in state.items()}


def export_checkpoint(spec: str, out_dir: str) -> Path:
    """`cotmi export`: a checkpoint (or a run's latest) -> a Hugging Face folder. Nothing is written
    unless the checkpoint is complete and OUT_DIR is new or empty; the folder appears only when
    fully written."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    info = read_checkpoint(resolve(spec, "export:"), "export:")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"export: {out} already exists and is not empty; nothing was written")
    tmp = out.with_name(out.name + PARTIAL)
    if tmp.exists():  # not ours to delete: perhaps another export in progress
        raise UsageError(f"export: {tmp} already exists (an interrupted or running export?); remove it "
                         "and retry; nothing was written")
    config = T5Config.from_json_file(info.path / T5_CONFIG)
    t5 = T5ForConditionalGeneration(config)
    state = consolidated_state_dict(info)
    missing, unexpected = t5.load_state_dict(state, strict=False)
    tied = set(getattr(t5, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise UsageError(f"export: {info.path}: its weights do not fit its own t5_config.json "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    t5.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(info.path / TOKENIZER)
    _save_hf(t5.eval(), None, tokenizer, out)
    return info.path
