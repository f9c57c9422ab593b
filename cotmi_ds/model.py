"""The student: a T5 (from_pretrained or built from a T5Config) inside a module that owns the loss.

The loss runs inside ``DistillModel.forward`` so that DeepSpeed wraps one module: under ZeRO-3 every
weight the loss touches is gathered by that module's own hooks.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from .config import TrainConfig, UsageError
from .losses.reference import mi_paper, token_ce
from .modes import MODES, combine


def build_student(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> T5ForConditionalGeneration:
    if cfg.model == "scratch":
        config = T5Config(
            vocab_size=-(-len(tokenizer) // 64) * 64,  # rounded up: friendlier matmul shapes
            d_model=cfg.scratch_d_model, d_ff=cfg.scratch_d_ff, d_kv=cfg.scratch_d_kv,
            num_layers=cfg.scratch_num_layers, num_decoder_layers=cfg.scratch_num_layers,
            num_heads=cfg.scratch_num_heads, feed_forward_proj="gated-gelu",  # as T5 v1.1
            tie_word_embeddings=False, dropout_rate=cfg.dropout or 0.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id)
        torch.manual_seed(cfg.seed)
        return T5ForConditionalGeneration(config)
    try:
        config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {cfg.model}: cannot load a model config (not a local model folder, "
                         f"and not reachable on the hub): {str(e).splitlines()[0]}") from None
    if config.model_type != "t5":
        raise UsageError(f"--model {cfg.model}: is a {config.model_type!r} model; the student must be a T5 "
                         "(t5, t5-v1_1, flan-t5)")
    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but --model {cfg.model} only "
                         f"{config.vocab_size} embeddings; pass the model's own tokenizer")
    overrides = {} if cfg.dropout is None else {"dropout_rate": cfg.dropout}
    return T5ForConditionalGeneration.from_pretrained(cfg.model, **overrides)


class DistillModel(nn.Module):
    """T5 + the mode's loss. ``forward(batch)`` returns the loss parts and their weighted ``total``;
    the mode (modes.py) decides which passes run and how the parts combine."""

    def __init__(self, t5: T5ForConditionalGeneration, cfg: TrainConfig):
        super().__init__()
        self.t5 = t5
        self.mode = MODES[cfg.mode]
        self.alpha, self.beta = cfg.alpha, cfg.beta

    def _logits(self, input_ids, attention_mask, labels) -> torch.Tensor:
        out = self.t5(input_ids=input_ids, attention_mask=attention_mask,
                      decoder_input_ids=self.t5._shift_right(labels), use_cache=False)
        return out.logits

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The label pass always runs (in `single` its target is rationale + separator + label);
        # the rationale pass only in the modes that train it (dss, mi).
        label_logits = self._logits(batch["pred_input_ids"], batch["pred_attention_mask"], batch["labels"])
        parts = {self.mode.label_part: token_ce(label_logits, batch["labels"])}
        if self.mode.rationale_pass:
            rationale_logits = self._logits(batch["expl_input_ids"], batch["expl_attention_mask"],
                                            batch["rationale_labels"])
            parts["rationale_ce"] = token_ce(rationale_logits, batch["rationale_labels"])
            if self.mode.mi:
                parts["mi"] = mi_paper(label_logits, rationale_logits)
        parts["total"] = combine(parts, self.mode, self.alpha, self.beta)
        return parts
