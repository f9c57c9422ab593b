"""The token lengths of a benchmark's rows, for measuring steps on batches as long as real ones.

A row's lengths are those of the four sequences a two-task batch holds: the label task's input
(``"predict: " + x``), the label, the rationale task's input (``"explain: " + x``) and the rationale,
tokenized as the trainer does (with eos, truncated at 1024 / 256 tokens). They come from the data when
it and the tokenizer can be read (the training split; where it is absent, as esnli's and anli1's can
be, valid and test), else from a histogram shipped with the package (``length_histograms/``, written
by ``benchmarks/length_histograms.py``), which records the tokenizer it was measured with.

A histogram keeps the joint distribution: counts of rows per bin of (input, label, rationale) lengths,
inputs and rationales in bins of ``BIN`` tokens, labels exact, and the difference between the two
inputs (the prefixes) exact.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

HISTOGRAM_DIR = Path(__file__).parent / "length_histograms"
BIN = 4
COLUMNS = ("pred_input_ids", "label_ids", "expl_input_ids", "rationale_ids")


def measure(dataset: str, data_root: str | None, tokenizer) -> tuple[list[tuple[int, ...]], str]:
    """Per row (pred input, label, expl input, rationale) lengths from the data, and which split."""
    from datasets import concatenate_datasets

    from cotmi_ds.config import load_config
    from cotmi_ds.data.encode import encode_split
    from cotmi_ds.data.splits import build_splits

    cfg = load_config(None, dataset=dataset, data_root=data_root)
    splits = build_splits(cfg, tokenizer.eos_token, allow_missing=True).rows
    names = ["train"] if "train" in splits else [n for n in ("valid", "test") if n in splits]
    rows = concatenate_datasets([splits[n] for n in names])
    encoded = encode_split(rows, tokenizer, cfg.max_input_length, cfg.max_target_length)
    lengths = list(zip(*([len(ids) for ids in encoded[c]] for c in COLUMNS)))
    return lengths, "+".join(names)


def histogram(lengths: list[tuple[int, ...]]) -> list[list[int]]:
    """Rows per bin: [input bin, label, input difference, rationale bin, count], sorted."""
    counts = Counter((p // BIN, lab, e - p, r // BIN) for p, lab, e, r in lengths)
    return [[*key, n] for key, n in sorted(counts.items())]


def draw(bins: list[list[int]], n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """``n`` rows drawn from a histogram (a length uniform within its bin)."""
    rng = random.Random(seed)
    keys, weights = [b[:4] for b in bins], [b[4] for b in bins]
    out = []
    for p, lab, diff, r in rng.choices(keys, weights, k=n):
        pred = max(1, p * BIN + rng.randrange(BIN))
        out.append((pred, lab, max(1, pred + diff), max(1, r * BIN + rng.randrange(BIN))))
    return out


def shipped(dataset: str) -> dict:
    path = HISTOGRAM_DIR / f"{dataset}.json"
    return json.loads(path.read_text())


def benchmark_lengths(dataset: str, data_root: str | None, tokenizer_name: str | None,
                      seed: int = 0) -> tuple[list[tuple[int, ...]], str]:
    """The rows' lengths and one line saying where they come from: the data with ``tokenizer_name``
    when both can be read, else the shipped histogram (as many rows as it counts)."""
    why = "no --tokenizer given"
    if tokenizer_name:
        from cotmi_ds.data.tokenizer import load_tokenizer
        from cotmi_ds.errors import UsageError

        try:
            tokenizer = load_tokenizer(tokenizer_name)
            lengths, splits = measure(dataset, data_root, tokenizer)
            return lengths, f"{dataset} {splits} split(s), {len(lengths):,} rows, tokenized with {tokenizer_name}"
        except UsageError as e:
            why = str(e)
    hist = shipped(dataset)
    rows = sum(b[4] for b in hist["bins"])
    return draw(hist["bins"], rows, seed), (f"the shipped {dataset} histogram ({rows:,} rows of {hist['splits']}, "
                                            f"{hist['tokenizer']}); {why}")
