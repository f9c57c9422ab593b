"""Evaluation by greedy generation from the label prompt, sharded over ranks with exact counts."""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .data.collate import pad
from .distributed import DistEnv, all_reduce_sum


@torch.no_grad()
def generate_labels(t5, tokenizer: PreTrainedTokenizerBase, inputs: list[list[int]], device: torch.device,
                    max_new_tokens: int, synced: bool) -> list[str]:
    ids, mask = pad(inputs, tokenizer.pad_token_id)
    out = t5.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                      num_beams=1, max_new_tokens=max_new_tokens, synced_gpus=synced)
    return [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]


def evaluate_split(t5, tokenizer: PreTrainedTokenizerBase, split: Dataset, env: DistEnv, *,
                   batch_size: int, max_new_tokens: int, zero3: bool,
                   label_from_text: Callable[[str], str] | None = None) -> dict[str, float]:
    """Exact-match accuracy of generated labels against the (decoded) gold labels, as DSS scores.
    ``label_from_text`` reads the label out of the generated text (mode single).

    Rank r takes examples r, r+W, r+2W, ...; every rank runs the same number of ``generate`` calls
    (a rank whose shard ran out repeats one example and counts nothing), because under ZeRO-3
    all ranks must take part in every forward. Counts are summed, so nothing is dropped or doubled.
    """
    n = len(split)
    mine = list(range(env.rank, n, env.world_size))
    calls = math.ceil(math.ceil(n / env.world_size) / batch_size)
    synced = zero3 and env.world_size > 1
    was_training = t5.training
    t5.eval()
    correct = total = 0
    for c in range(calls):
        idx = mine[c * batch_size:(c + 1) * batch_size]
        rows = split[idx if idx else [0]]
        preds = generate_labels(t5, tokenizer, rows["pred_input_ids"], env.device, max_new_tokens, synced)
        if not idx:
            continue
        if label_from_text is not None:  # mode single: the label follows the rationale
            preds = [label_from_text(p) for p in preds]
        gold = [s.strip() for s in tokenizer.batch_decode(rows["label_ids"], skip_special_tokens=True)]
        correct += sum(p == g for p, g in zip(preds, gold))
        total += len(idx)
    t5.train(was_training)
    correct, total = all_reduce_sum([correct, total], env)
    return {"accuracy": correct / total, "correct": int(correct), "total": int(total)}


def majority_baseline(train: Dataset, test: Dataset) -> float:
    """Accuracy of always answering the most common training label: the floor to beat."""
    label, _ = Counter(train["label"]).most_common(1)[0]
    return sum(y.strip() == label.strip() for y in test["label"]) / len(test)
