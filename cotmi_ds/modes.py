"""Training modes (METHOD.md §2): which forward passes run and how their losses combine."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mode:
    name: str
    rationale_pass: bool  # run the "explain: " task as well
    mi: bool              # add the mutual-information term


MODES: dict[str, Mode] = {
    "dss": Mode("dss", rationale_pass=True, mi=False),  # Distilling Step-by-Step
    "mi": Mode("mi", rationale_pass=True, mi=True),     # Chen et al., 2024
}


def combine(parts: dict[str, torch.Tensor], mode: Mode, alpha: float, beta: float) -> torch.Tensor:
    """dss: α·CE_label + (1−α)·CE_rationale;  mi: the same + β·L_MI."""
    total = alpha * parts["label_ce"] + (1.0 - alpha) * parts["rationale_ce"]
    if mode.mi:
        total = total + beta * parts["mi"]
    return total
