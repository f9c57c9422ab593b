"""Saving the trained student as a Hugging Face model (save_pretrained), from any ZeRO stage."""
from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .distributed import DistEnv, barrier


def export_hf_model(engine, tokenizer: PreTrainedTokenizerBase, out_dir: Path, env: DistEnv, zero3: bool) -> None:
    """Write ``out_dir`` (config, safetensors weights, tokenizer) loadable by from_pretrained.

    Under ZeRO-3 each rank holds a shard: the full state dict is gathered onto rank 0 first (a
    collective, so every rank calls this)."""
    t5 = engine.module.t5
    state = None
    if zero3:
        full = engine._zero3_consolidated_16bit_state_dict()
        if env.is_main:
            state = {k.removeprefix("t5."): v for k, v in full.items()}
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        t5.save_pretrained(out_dir, state_dict=state)
        tokenizer.save_pretrained(out_dir)
    barrier(env)
