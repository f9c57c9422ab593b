"""The plain (unfused) losses, written to follow docs/method.md and the released code line by line.

These hold full [B, T, V] logits in memory; they are the ground truth the other implementations
are tested against, and ``--loss reference`` trains with them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, so the tests can check other implementations in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the non-ignored target tokens of the batch, in fp32 (what HF's T5 loss is)."""
    return F.cross_entropy(_f32(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def mi_paper(label_logits: torch.Tensor, rationale_logits: torch.Tensor) -> torch.Tensor:
    """The MI term exactly as released (docs/method.md), quirks included.

    p̄[b, v] = max_t softmax(z_lab[b, t])[v], detached; q̄[b, v] = max_t softmax(z_rat[b, t])[v].
    L = mean_b −Σ_v p̄[b, v] · log_softmax(q̄[b])[v] — i.e. ``CrossEntropyLoss()(q̄, p̄)``:
    every decoder position counts, padded ones too; q̄ (probabilities) is fed as logits; p̄ is
    not normalised. Gradient reaches only the rationale pass.
    """
    # torch.max (not amax): its gradient goes to one arg-max position, as in the release.
    p_bar = _f32(label_logits.detach()).softmax(dim=-1).max(dim=-2).values
    q_bar = _f32(rationale_logits).softmax(dim=-1).max(dim=-2).values
    return -(p_bar * q_bar.log_softmax(dim=-1)).sum(dim=-1).mean()


def mi_masked(label_logits: torch.Tensor, rationale_logits: torch.Tensor,
              labels: torch.Tensor, rationale_labels: torch.Tensor) -> torch.Tensor:
    """A corrected MI term (``--mi_variant masked``), not the released one.

    Only positions with a target count; the rationale side uses log-probabilities and the label
    side a normalised target:
    p̄[b, v] = max over target positions t of softmax(z_lab[b, t])[v] (detached), p̂ = p̄ / Σ_v p̄;
    log q̄[b, v] = max over target positions t of log_softmax(z_rat[b, t])[v];
    L = mean over examples with targets in both tasks of −Σ_v p̂[b, v] · log q̄[b, v]  (≥ 0).
    """
    lab_mask = labels.ne(IGNORE_INDEX)
    rat_mask = rationale_labels.ne(IGNORE_INDEX)
    p = _f32(label_logits.detach()).softmax(dim=-1).masked_fill(~lab_mask[..., None], -1.0)
    p_bar = p.max(dim=-2).values
    p_hat = p_bar / p_bar.sum(dim=-1, keepdim=True)
    log_q = _f32(rationale_logits).log_softmax(dim=-1).masked_fill(~rat_mask[..., None], float("-inf"))
    log_q_bar = log_q.max(dim=-2).values
    ok = lab_mask.any(dim=-1) & rat_mask.any(dim=-1)
    per_example = torch.where(ok, -(p_hat * log_q_bar).sum(dim=-1), 0.0)
    return per_example.sum() / ok.sum().clamp(min=1)


MI_TERMS = {"paper": lambda lab, rat, labels, rat_labels: mi_paper(lab, rat), "masked": mi_masked}


def mi_term(variant: str, label_logits: torch.Tensor, rationale_logits: torch.Tensor,
            labels: torch.Tensor, rationale_labels: torch.Tensor) -> torch.Tensor:
    return MI_TERMS[variant](label_logits, rationale_logits, labels, rationale_labels)
