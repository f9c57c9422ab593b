"""Writes the length histograms shipped in cotmi_ds/data/length_histograms/ (see cotmi_ds/data/lengths.py).

    python benchmarks/length_histograms.py --data_root DIR [--tokenizer google/t5-v1_1-base]

With ``--tokenizer`` (a T5 tokenizer folder or hub name) the lengths are the student's own. Without,
a stand-in is trained first: a 32,000-piece unigram sentencepiece model (T5's vocabulary size and
model type) on the text of all four benchmarks; the histograms record which one measured them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cotmi_ds.data.datasets import DSS_DATASETS  # noqa: E402
from cotmi_ds.data.lengths import BIN, HISTOGRAM_DIR, histogram, measure  # noqa: E402

STAND_IN = ("a stand-in for T5's tokenizer: a 32,000-piece unigram sentencepiece model trained on the "
            "four benchmarks' text")


def stand_in_tokenizer(data_root: str):
    from cotmi_ds.config import load_config
    from cotmi_ds.data.datasets import T5_EOS
    from cotmi_ds.data.pipeline import tokenizer_texts
    from cotmi_ds.data.splits import build_splits
    from cotmi_ds.data.tokenizer import tokenizer_from_sentencepiece, train_sentencepiece

    texts = []
    for name in DSS_DATASETS:
        splits = build_splits(load_config(None, dataset=name, data_root=data_root), T5_EOS, allow_missing=True)
        for rows in splits.rows.values():
            texts += tokenizer_texts(rows)
    return tokenizer_from_sentencepiece(train_sentencepiece(texts, 32000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_root", required=True)
    ap.add_argument("--tokenizer", default=None)
    args = ap.parse_args()
    if args.tokenizer:
        from cotmi_ds.data.tokenizer import load_tokenizer

        tokenizer, described = load_tokenizer(args.tokenizer), f"tokenized with {args.tokenizer}"
    else:
        tokenizer, described = stand_in_tokenizer(args.data_root), STAND_IN
    HISTOGRAM_DIR.mkdir(exist_ok=True)
    for name in DSS_DATASETS:
        lengths, splits = measure(name, args.data_root, tokenizer)
        out = {"dataset": name, "splits": splits, "tokenizer": described, "bin": BIN,
               "columns": ["input // bin", "label", "explain input - predict input", "rationale // bin", "rows"],
               "bins": histogram(lengths)}
        path = HISTOGRAM_DIR / f"{name}.json"
        path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
        print(f"{path}: {len(lengths):,} rows of {splits}, {len(out['bins']):,} bins")


if __name__ == "__main__":
    main()
