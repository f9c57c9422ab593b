"""What the lean layers and activation checkpointing remove: the bytes one forward of the trainer's
step (DistillModel, mode mi, the fused loss, encoder once) hands to autograd for the backward, at
t5-v1_1-base shapes (B 8, inputs 128, rationales 128, labels 8; random weights): with
transformers' own layers, with the lean layers (the default), and with the lean layers and
``--gradient_checkpointing``. Run from the checkout: ``python benchmarks/saved_activations.py``.

Counted through ``torch.autograd.graph.saved_tensors_hooks``; each saved tensor is dropped as it is
counted (no backward runs), so the probe needs only the model and one layer's working memory.
Weights saved by a matmul are not counted (no new memory); a tensor saved by two operations counts
twice. Not counted: the input of each checkpointed block, which the checkpoint keeps itself (one
``[tokens, d_model]`` tensor per block).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cotmi_ds.config import load_config  # noqa: E402
from cotmi_ds.model.student import DistillModel  # noqa: E402


def main() -> None:
    cfg = json.loads((REPO / "benchmarks" / "t5-v1_1-base.json").read_text())
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(**{k: v for k, v in cfg.items() if not k.startswith("_")})).train()
    g = torch.Generator().manual_seed(0)
    B, V = 8, t5.config.vocab_size

    def ids(n):
        return torch.randint(2, V, (B, n), generator=g)
    batch = {"pred_input_ids": ids(128), "pred_attention_mask": torch.ones(B, 128, dtype=torch.long),
             "labels": ids(8), "expl_input_ids": ids(128), "expl_attention_mask": torch.ones(B, 128, dtype=torch.long),
             "rationale_labels": ids(128)}
    weights = {p.untyped_storage().data_ptr() for p in t5.parameters()}
    # One T5 for all three: DistillModel switches the lean layers and checkpointing on in place (never
    # off), hence this order.
    for lean, checkpointing in ((False, False), (True, False), (True, True)):
        model = DistillModel(t5, load_config(gradient_checkpointing=checkpointing, lean_layers=lean))
        saved = {"bytes": 0, "tensors": 0}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved["bytes"] += t.numel() * t.element_size()
                saved["tensors"] += 1

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            model(batch)
        print(f"--lean_layers {str(lean).lower()} --gradient_checkpointing {str(checkpointing).lower()}: "
              f"{saved['bytes'] / 2**30:.3f} GiB in "
              f"{saved['tensors']} saved tensors (forward {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
