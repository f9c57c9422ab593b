"""Run under torchrun (2 CPU ranks) by test_fused_zero3.py: for a tied (T5 v1.0) and an untied
(T5 v1.1) tiny T5, train one ZeRO-3 engine with ``--loss fused`` and one with ``--loss reference``
from identical weights on identical batches, and write both loss curves (rank 0) as JSON.

Usage: torchrun --nproc_per_node 2 tests/distributed/fused_zero3_worker.py OUT.json STEPS
"""
import json
import sys

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from cotmi_ds.config import load_config
from cotmi_ds.distributed import barrier, init_distributed, shutdown
from cotmi_ds.training.engine import build_ds_config, create_engine
from cotmi_ds.model.student import DistillModel

V, PAD = 96, 0


def student(tied: bool) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(vocab_size=V, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=tied,
                      pad_token_id=PAD, eos_token_id=1, decoder_start_token_id=PAD)
    t5 = T5ForConditionalGeneration(config)
    if not tied:  # as a v1.1 checkpoint loads: a head of its own
        t5.lm_head.weight = nn.Parameter(torch.randn(V, 32) * 0.5)
    return t5


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """Right-padded two-task batch of 4 examples, different on each rank and step."""
    g = torch.Generator().manual_seed(1000 * step + rank)

    def padded(n_rows, width, pad, low=2):
        ids = torch.randint(low, V, (n_rows, width), generator=g)
        lengths = torch.randint(1, width + 1, (n_rows,), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        return ids.masked_fill(mask == 0, pad), mask

    pred_ids, pred_mask = padded(4, 12, PAD)
    expl_ids, expl_mask = padded(4, 14, PAD)
    labels, _ = padded(4, 5, -100)
    rationale, _ = padded(4, 20, -100)
    return {"pred_input_ids": pred_ids, "pred_attention_mask": pred_mask, "labels": labels,
            "expl_input_ids": expl_ids, "expl_attention_mask": expl_mask, "rationale_labels": rationale}


def main(out_path: str, steps: int) -> None:
    env = init_distributed(300)
    results = {}
    for tied in (True, False):
        for loss in ("fused", "reference"):
            cfg = load_config(loss=loss, mode="mi", ds_config="zero3", batch_size=4, lr=1e-2, max_steps=steps,
                              precision="fp32", grad_clip=0.0)
            ds_config = build_ds_config(cfg, env, "fp32", 32)
            model = DistillModel(student(tied), cfg)
            engine = create_engine(model, ds_config, cfg, env.world_size).ds
            head = engine.module.t5.lm_head.weight
            run = {"tied": head is engine.module.t5.shared.weight, "head_numel_local": head.numel(),
                   "head_numel_full": getattr(head, "ds_numel", -1), "loss": []}
            for step in range(steps):
                parts = engine(batch(step, env.rank))
                engine.backward(parts["total"])
                engine.step()
                run["loss"].append({k: v.item() for k, v in parts.items()})
            results[f"{'tied' if tied else 'untied'}/{loss}"] = run
            engine.destroy()
    if env.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f)
    # No rank tears the group down while the other may still be in a collective (an abort at exit
    # was seen on a loaded machine).
    barrier(env)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
