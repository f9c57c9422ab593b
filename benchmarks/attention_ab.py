"""Eager against SDPA attention in one process, step by step in turns (A B A B): which is faster.

    python benchmarks/attention_ab.py [--lengths cqa] [--batch_size 8] [--rounds 4] [--steps 3]

The trainer's forward and backward (DistillModel, the fused loss, the lean layers) of a T5 of
t5-v1_1-base's shapes (benchmarks/t5-v1_1-base.json, random weights, fp32) on batches with the
benchmark's lengths, built as `cotmi bench step --lengths` builds them; the attention is switched in
place between steps (``set_attn_implementation``), so both run on the same weights, batches and
process. Prints each one's time per pass over the batches (each batch at its fastest round, and the
median round) and the ratio. The optimizer step is left out: it does not depend on the attention.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="cqa")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from benchmarks.options import StepOptions
    from benchmarks.step_bench import _length_batches
    from cotmi_ds.config import load_config
    from cotmi_ds.model.student import DistillModel

    config = {k: v for k, v in json.loads((REPO / "benchmarks" / "t5-v1_1-base.json").read_text()).items()
              if not k.startswith("_")}
    sets, lines = _length_batches(StepOptions(lengths=args.lengths, batch_size=args.batch_size, steps=args.steps),
                                  config["vocab_size"])
    print("\n".join(lines), flush=True)
    torch.manual_seed(0)
    model = DistillModel(T5ForConditionalGeneration(T5Config(**config)), load_config()).train()
    times = {"eager": [], "sdpa": []}
    for r in range(args.rounds + 1):  # the first round warms up
        for attention in times:
            model.t5.set_attn_implementation(attention)
            for batch in sets["random"]:
                t = time.perf_counter()
                model(batch)["total"].backward()
                model.t5.zero_grad(set_to_none=True)
                if r:
                    times[attention].append(time.perf_counter() - t)
    passes = {}
    for attention, step_s in times.items():
        rounds = [step_s[i:i + args.steps] for i in range(0, len(step_s), args.steps)]
        passes[attention] = (sum(min(b) for b in zip(*rounds)), statistics.median(map(sum, rounds)))
        print(f"{attention:<6} {passes[attention][0]:.2f} s per pass (each batch's fastest round), "
              f"{passes[attention][1]:.2f} s (median round)", flush=True)
    print(f"sdpa / eager: {passes['eager'][0] / passes['sdpa'][0]:.3f}x the speed (fastest rounds), "
          f"{passes['eager'][1] / passes['sdpa'][1]:.3f}x (median rounds); {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
