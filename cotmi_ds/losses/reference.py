"""The plain (unfused) losses, written to follow METHOD.md §3 and the released code line by line.

These hold full [B, T, V] logits in memory; they are the ground truth the other implementations
are tested against, and ``--loss reference`` trains with them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the non-ignored target tokens of the batch, in fp32 (what HF's T5 loss is)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def mi_paper(label_logits: torch.Tensor, rationale_logits: torch.Tensor) -> torch.Tensor:
    """The MI term exactly as released (METHOD.md §3), quirks included.

    p̄[b, v] = max_t softmax(z_lab[b, t])[v], detached; q̄[b, v] = max_t softmax(z_rat[b, t])[v].
    L = mean_b −Σ_v p̄[b, v] · log_softmax(q̄[b])[v] — i.e. ``CrossEntropyLoss()(q̄, p̄)``:
    every decoder position counts, padded ones too; q̄ (probabilities) is fed as logits; p̄ is
    not normalised. Gradient reaches only the rationale pass.
    """
    # torch.max (not amax): its gradient goes to one arg-max position, as in the release.
    p_bar = label_logits.detach().float().softmax(dim=-1).max(dim=-2).values
    q_bar = rationale_logits.float().softmax(dim=-1).max(dim=-2).values
    return -(p_bar * q_bar.log_softmax(dim=-1)).sum(dim=-1).mean()
