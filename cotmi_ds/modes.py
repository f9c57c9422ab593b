"""Training modes (docs/method.md): which forward passes run and how their losses combine.

| mode       | encoder input    | decoder target(s)                        | loss                              |
|------------|------------------|------------------------------------------|-----------------------------------|
| standard   | x                | y (gold)                                 | CE                                |
| distill    | x                | y (the teacher's label)                  | CE                                |
| single     | x                | r + SINGLE_SEPARATOR + y                 | CE                                |
| dss        | "predict: " + x  | y;  and "explain: " + x -> r             | α·CE_label + (1−α)·CE_rationale   |
| mi         | as dss           | as dss                                   | the same + β·L_MI                 |

The label pass always runs; only dss and mi run the rationale pass (label-only modes neither
tokenize rationales nor run a second forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept light: the CLI validates --mode before torch is imported
    import torch

# `single`: the one target is f"{rationale}{SINGLE_SEPARATOR}{label}"; at evaluation the label is
# the generated text after the last "So the answer is" (the phrase the teachers use themselves).
SINGLE_SEPARATOR = " So the answer is "
# What a run trains on: gold labels, or the teacher's (--label_type).
LABEL_TYPES = ("gt", "llm")


@dataclass(frozen=True)
class Mode:
    name: str
    prefixed: bool        # "predict: " / "explain: " task prefixes on the encoder input
    rationale_pass: bool  # run the "explain: " task as well
    mi: bool              # add the mutual-information term
    single_target: bool = False  # the label pass's target is rationale + separator + label
    label_type: str | None = None  # the label type the mode is defined by (None: either)

    @property
    def needs_rationales(self) -> bool:
        """Trained on the teacher's rationales (the rationale pass, or single's combined target)."""
        return self.rationale_pass or self.single_target

    @property
    def label_part(self) -> str:
        """Name of the label pass's CE in the loss parts (and in TensorBoard, loss/<name>)."""
        return "single_ce" if self.single_target else "label_ce"

    @property
    def target_column(self) -> str:
        """The encoded column the label pass is trained on."""
        return "target_ids" if self.single_target else "label_ids"

    @property
    def encoding(self) -> tuple[bool, bool, bool]:
        """What the tokenized splits depend on (modes with equal encodings share a cache entry)."""
        return self.prefixed, self.rationale_pass, self.single_target


MODES: dict[str, Mode] = {
    "standard": Mode("standard", prefixed=False, rationale_pass=False, mi=False, label_type="gt"),
    "distill": Mode("distill", prefixed=False, rationale_pass=False, mi=False, label_type="llm"),
    "single": Mode("single", prefixed=False, rationale_pass=False, mi=False, single_target=True),
    "dss": Mode("dss", prefixed=True, rationale_pass=True, mi=False),  # Distilling Step-by-Step
    "mi": Mode("mi", prefixed=True, rationale_pass=True, mi=True),     # Chen et al., 2024
}


def mode_of(cfg) -> Mode:
    """The Mode a config (a TrainConfig, or anything with a ``mode`` name) trains in."""
    return MODES[cfg.mode]


def label_type_of(cfg) -> str:
    """--label_type, or the labels the mode is defined by (distill: the teacher's), else gold."""
    return cfg.label_type or mode_of(cfg).label_type or "gt"


def combine(parts: dict[str, torch.Tensor], mode: Mode, alpha: float, beta: float) -> torch.Tensor:
    """Label-only modes: the one CE.  dss: α·CE_label + (1−α)·CE_rationale;  mi: the same + β·L_MI."""
    if not mode.rationale_pass:
        return parts[mode.label_part]
    total = alpha * parts["label_ce"] + (1.0 - alpha) * parts["rationale_ce"]
    if mode.mi:
        total = total + beta * parts["mi"]
    return total


def label_from_generation(text: str, mode: Mode) -> str:
    """The predicted label in generated text. `single`: the text after the last separator, or ''
    (never right) when the model did not write the separator."""
    if not mode.single_target:
        return text
    head, sep, label = text.rpartition(SINGLE_SEPARATOR.strip())
    return label.strip() if sep else ""


def generation_length(mode: Mode, max_new_tokens: int, max_target_length: int) -> int:
    """Evaluation's generation cap. Targets are cut to --max_target_length tokens (EOS included), so
    a longer generation can never be scored right: never more than that. `single` must write the
    whole rationale before the label, so it generates as long as its training target."""
    return max_target_length if mode.single_target else min(max_new_tokens, max_target_length)
