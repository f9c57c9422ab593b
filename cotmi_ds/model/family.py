"""The T5 family a student can come from, by the ``model_type`` of its config.

T5 v1.0 and v1.1, Flan-T5, ByT5 and UL2-style checkpoints are ``t5``; mT5 is ``mt5`` (the same
architecture as T5 v1.1, its own transformers classes, a 250,112-token vocabulary). Anything else is
refused with one line. Standard library at import: `cotmi eval` and `cotmi plan` check a folder's
``config.json`` before torch is imported.
"""
from __future__ import annotations

from typing import Any

from cotmi_ds.errors import UsageError, brief

# model_type -> the transformers class that builds and loads it
STUDENT_CLASSES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}
FAMILY = "a T5 (t5, t5-v1_1, flan-t5, byt5, ul2) or an mT5"


def check_model_type(model_type: Any, what: str) -> str:
    """``model_type`` if a student can be one, else a UsageError naming ``what`` (a flag and value)."""
    if model_type not in STUDENT_CLASSES:
        raise UsageError(f"{what}: is a {brief(model_type)} model; the student must be {FAMILY}")
    return model_type


def student_class(config):
    """The transformers class for a config of the family (T5ForConditionalGeneration, ...)."""
    import transformers

    return getattr(transformers, STUDENT_CLASSES[check_model_type(config.model_type, "the student config")])


def config_from_dict(data: dict[str, Any]):
    """A config object of the right class from a config.json's contents (``model_type`` decides;
    a file without one, as older T5 configs are, is a T5's)."""
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = check_model_type(data.pop("model_type", "t5"), "the student config")
    return AutoConfig.for_model(model_type, **data)


def scales_decoder_output(config) -> bool:
    """Whether the model multiplies the last decoder states by d_model^-0.5 before its LM head: T5
    v1.0 does (transformers 5 keeps this in ``scale_decoder_outputs``), v1.1, Flan-T5 and ByT5 do
    not, and mT5 never does (its class has no such step)."""
    return config.model_type == "t5" and bool(getattr(config, "scale_decoder_outputs", False))
