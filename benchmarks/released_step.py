"""The released training step, re-implemented as the baseline of `cotmi bench step`.

What one optimizer step of the paper's release does (Distilling Step-by-Step's TaskPrefixTrainer
with the MI term added, run by Hugging Face's Seq2SeqTrainer; docs/method.md):
- ``model(input_ids, attention_mask, labels=...)`` once per task: T5 computes the full
  [B, T, V] logits and its own mean CE over non-ignored targets;
- the MI term from the full softmax of both passes' logits: the per-vocabulary max over every
  decoder position (padding included), the label side detached, ``CrossEntropyLoss()(q̄, p̄)``;
- loss = α·CE_label + (1−α)·CE_rationale (+ β·L_MI in mode mi), ``backward``, gradient-norm
  clipping (the Trainer's ``max_grad_norm``), torch AdamW, linear decay, ``zero_grad``.
bf16 is the Trainer's ``--bf16``: fp32 weights under ``torch.autocast``.

It deliberately shares no code with cotmi_ds, so it cannot inherit the project's optimisations.
(The release pinned transformers 4.24, whose Trainer defaulted to Hugging Face's own Python AdamW;
torch's AdamW used here is faster, which favours the baseline.)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration, get_linear_schedule_with_warmup


class ReleasedStep:
    def __init__(self, model: T5ForConditionalGeneration, *, mi: bool, alpha: float, beta: float, lr: float,
                 betas: tuple[float, float], eps: float, grad_clip: float, max_steps: int,
                 bf16: bool):
        self.model, self.mi, self.alpha, self.beta, self.grad_clip = model, mi, alpha, beta, grad_clip
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 0, max_steps)
        device_type = next(model.parameters()).device.type
        self.autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.model(input_ids=batch["pred_input_ids"], attention_mask=batch["pred_attention_mask"],
                          labels=batch["labels"])
        expl = self.model(input_ids=batch["expl_input_ids"], attention_mask=batch["expl_attention_mask"],
                          labels=batch["rationale_labels"])
        parts = {"label_ce": pred.loss, "rationale_ce": expl.loss}
        total = self.alpha * pred.loss + (1.0 - self.alpha) * expl.loss
        if self.mi:
            p = torch.max(F.softmax(pred.logits, dim=-1), dim=1)[0].detach()
            q = torch.max(F.softmax(expl.logits, dim=-1), dim=1)[0]
            parts["mi"] = nn.CrossEntropyLoss()(q, p)
            total = total + self.beta * parts["mi"]
        parts["total"] = total
        return parts

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.model.train()
        with self.autocast:
            parts = self.loss(batch)
        parts["total"].backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.model.zero_grad(set_to_none=True)
        return parts
