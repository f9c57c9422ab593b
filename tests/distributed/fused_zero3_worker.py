"""Run under torchrun (2 CPU ranks) by test_fused_zero3.py: for a tied (T5 v1.0) and an untied
(T5 v1.1) tiny T5, train one ZeRO-3 engine with ``--loss fused`` and one with ``--loss reference``
(and for v1.1 one with ``--loss fused --gradient_checkpointing``) from identical weights on identical
batches, and write the loss curves (rank 0) as JSON. Students are built as the trainer builds them at
ZeRO-3 (zero.Init); a saved T5 v1.1 (own head, weights in several safetensors shards) is loaded as the
trainer loads it at ZeRO-3, each rank reading its partitions' slices, and compared with from_pretrained.
The same launch also takes the first AdamW update at bf16 ZeRO 0-3 on two ranks (``first_updates``).

Usage: torchrun --nproc_per_node 2 tests/distributed/fused_zero3_worker.py OUT.json STEPS
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from cotmi_ds.config import load_config
from cotmi_ds.distributed import barrier, init_distributed, shutdown
from cotmi_ds.ds_configs import choose_ds_config
from cotmi_ds.training.engine import create_engine
from cotmi_ds.checkpoint.layout import model_identity
from cotmi_ds.model.student import DistillModel, construct, zero3_construction

V, PAD = 96, 0


def tiny_config(tied: bool) -> T5Config:
    return T5Config(vocab_size=V, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=tied,
                    pad_token_id=PAD, eos_token_id=1, decoder_start_token_id=PAD)


def student(tied: bool, ds_config: dict) -> tuple[T5ForConditionalGeneration, int]:
    """Built as the trainer builds it at ZeRO-3, partitioned as it is created (zero.Init), and the
    elements of non-persistent weights its rank holds then (0: none is whole)."""
    torch.manual_seed(0)
    with zero3_construction(ds_config):
        t5 = construct(tiny_config(tied))
    held = sum(p.numel() for p in t5.parameters() if not p.ds_persist)
    if rank_slices_repeat(t5):
        raise AssertionError("the ranks initialised their slices with the same values")
    if not tied:  # as a v1.1 checkpoint loads: a head of its own (deepspeed.initialize partitions it)
        t5.lm_head.weight = nn.Parameter(torch.randn(V, 32) * 0.5)
    return t5, held


def rank_slices_repeat(t5) -> bool:
    """Whether, in any weight, rank 1's slice starts with rank 0's values (one random stream for all
    ranks would give every rank the same numbers)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(t5.parameters())):
        for p in t5.parameters():
            flat, half = p.detach().flatten(), -(-p.numel() // 2)
            if p.std() > 0 and torch.equal(flat[:p.numel() - half], flat[half:]):
                return True
    return False


def gathered_state(t5) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(t5.parameters())):
        return {k: v.detach().clone() for k, v in t5.state_dict().items()}


def pretrained_check(folder: Path, ds_config: dict, env) -> dict:
    """The trainer's ZeRO-3 load of a saved student: every tensor equal to from_pretrained's, each
    rank having read about its share of the elements (never a whole weight)."""
    from transformers import AutoConfig

    from cotmi_ds.model import weights
    from cotmi_ds.model.student import load_pretrained

    torch.manual_seed(1)
    saved = T5ForConditionalGeneration(tiny_config(False))
    saved.lm_head.weight = nn.Parameter(torch.randn(V, 32))  # a v1.1 checkpoint's own head
    if env.is_main:
        saved.save_pretrained(folder, max_shard_size="20KB")  # sharded: an index and several files
    barrier(env)
    reads = []
    load_partitions = weights.load_partitions
    weights.load_partitions = lambda *a: reads.append(load_partitions(*a)) or reads[-1]
    try:
        with zero3_construction(ds_config):
            loaded = load_pretrained(str(folder), AutoConfig.from_pretrained(folder))
    finally:
        weights.load_partitions = load_partitions
    plain = T5ForConditionalGeneration.from_pretrained(folder)
    full, expected = gathered_state(loaded), plain.state_dict()
    distinct = {id(p): p.ds_numel for p in loaded.parameters()}
    return {"local_numel": sum(p.numel() for p in loaded.parameters()),
            "shards": len(set(weights.weight_files(folder).values())),
            "keys_equal": full.keys() == expected.keys(),
            "equal": [k for k, v in expected.items() if not torch.equal(full[k], v)] == [],
            "own_head": loaded.lm_head.weight is not loaded.shared.weight,
            "read": reads, "elements": sum(distinct.values()), "tensors": len(distinct),
            "same_identity": model_identity(loaded, FakeTokenizer()) == model_identity(plain, FakeTokenizer())}


class FakeTokenizer:
    def get_vocab(self):
        return {"a": 0}


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


def first_updates(env) -> dict:
    """bf16 at each ZeRO stage on two ranks, each with its own gradient: AdamW's step counts before and
    after the first update, and the largest distance of the fp32 masters from torch's AdamW stepped
    once on the ranks' mean gradient, clipped to norm 1 (tests/unit/test_engine_steps.py, one rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from tests.unit.test_engine_steps import Affine, _adamw_steps, _master

    xs = [torch.tensor([1.0, -0.5, 0.25, 2.0]), torch.tensor([0.5, 1.0, -2.0, 0.25])]  # exact in bf16
    out = {}
    for stage in ("zero0", "zero1", "zero2", "zero3"):
        cfg = load_config(ds_config=stage, batch_size=1, precision="bf16", grad_clip=1.0, warmup_steps=0,
                          max_steps=10, weight_decay=0.1, lr=1e-2)
        ds_config = choose_ds_config(stage, env.world_size).fill(cfg, env, "bf16", 4)
        model = Affine()
        engine = create_engine(model, ds_config, cfg, env.world_size)
        before = _adamw_steps(engine.ds.basic_optimizer)
        engine.ds.backward(engine.ds(xs[env.rank]))
        engine.step()
        after = _adamw_steps(engine.ds.basic_optimizer)
        reference = Affine()
        adamw = torch.optim.AdamW(reference.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        ((reference(xs[0]) + reference(xs[1])) / 2).backward()  # DeepSpeed averages over the ranks
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip)
        adamw.step()
        masters = {name: (safe_get_full_fp32_param(p) if engine.ds.zero_optimization() else _master(engine.ds, p))
                   for name, p in model.named_parameters()}  # a collective at ZeRO-3: every rank asks
        diffs = [(masters[name] - p.detach()).abs().max().item() for name, p in reference.named_parameters()]
        out[stage] = {"before": sorted(before), "after": sorted(after), "max_diff": max(diffs)}
        engine.ds.destroy()
    return out


def main(out_path: str, steps: int) -> None:
    env = init_distributed(300)
    results = {}
    for tied in (True, False):
        # Untied also with activation checkpointing: the recomputation gathers the weights again.
        for loss, checkpointing in [("fused", False), ("reference", False)] + [("fused", True)] * (not tied):
            cfg = load_config(loss=loss, mode="mi", ds_config="zero3", batch_size=4, lr=1e-2, max_steps=steps,
                              precision="fp32", grad_clip=0.0, gradient_checkpointing=checkpointing)
            ds_config = choose_ds_config(cfg.ds_config, env.world_size).fill(cfg, env, "fp32", 32)
            t5, built_local = student(tied, ds_config)
            model = DistillModel(t5, cfg)
            trainer_engine = create_engine(model, ds_config, cfg, env.world_size)
            engine = trainer_engine.ds
            head = engine.module.t5.lm_head.weight
            run = {"tied": head is engine.module.t5.shared.weight, "head_numel_local": head.numel(),
                   "head_numel_full": getattr(head, "ds_numel", -1), "built_local_numel": built_local,
                   "loss": [],
                   "checkpointing": engine.training and engine.module.t5.decoder.block[0].gradient_checkpointing}
            for step in range(steps):
                parts = engine(batch(step, env.rank))
                trainer_engine.backward(parts["total"])  # the trainer's (with checkpointing: host_memory.py)
                engine.step()
                run["loss"].append({k: v.item() for k, v in parts.items()})
            results[f"{'tied' if tied else 'untied'}/{loss}" + ("+checkpointing" if checkpointing else "")] = run
            engine.destroy()
    results["pretrained"] = pretrained_check(Path(out_path).parent / "pretrained", ds_config, env)
    results["first_updates"] = first_updates(env)
    if env.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f)
    # No rank tears the group down while the other may still be in a collective (an abort at exit
    # was seen on a loaded machine).
    barrier(env)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
