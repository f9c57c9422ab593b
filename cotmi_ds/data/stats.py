"""`cotmi data stats`: what a dataset looks like to the trainer, split by split."""
from __future__ import annotations

import numpy as np

from cotmi_ds.config import TrainConfig
from cotmi_ds.modes import mode_of
from cotmi_ds.data.datasets import T5_EOS
from cotmi_ds.data.encode import LABEL_PREFIX
from cotmi_ds.data.pipeline import tokenizer_texts
from cotmi_ds.data.splits import build_splits
from cotmi_ds.data.tokenizer import given_tokenizer, load_tokenizer, tokenizer_from_sentencepiece, train_sentencepiece

PERCENTILES = (50, 90, 99)


def _length_row(name: str, lengths: list[int], cap: int) -> str:
    p = np.percentile(lengths, PERCENTILES, method="nearest") if lengths else [0] * len(PERCENTILES)
    over = sum(n > cap for n in lengths)
    return (f"    {name:<10}" + "".join(f"{int(v):>7}" for v in p) + f"{max(lengths, default=0):>7}"
            + f"   {over:,} (> {cap})")


def dataset_stats(cfg: TrainConfig) -> str:
    """The report: per split, rows, rows excluded, teacher outputs that fell back to the
    placeholder label, teacher-label accuracy against gold, and token-length percentiles of the
    inputs, labels and rationales (with how many exceed the length caps and get truncated)."""
    given = given_tokenizer(cfg)
    if given:
        tokenizer = load_tokenizer(*given)
        splits = build_splits(cfg, tokenizer.eos_token, allow_missing=True)
        tok_note = f"tokenizer {given[0]}"
    else:
        splits = build_splits(cfg, T5_EOS, allow_missing=True)
        basis = splits.rows["train"] if "train" in splits.rows else next(iter(splits.rows.values()))
        tokenizer = tokenizer_from_sentencepiece(train_sentencepiece(tokenizer_texts(basis),
                                                                     cfg.scratch_vocab_size))
        tok_note = (f"a {len(tokenizer)}-piece sentencepiece tokenizer trained on these rows, as "
                    f"--model scratch does; pass --tokenizer NAME for a real student's")
    prefix = LABEL_PREFIX if mode_of(cfg).prefixed else ""
    s = splits.summary
    lines = [f"{s.dataset}" + (f" from {s.data_root}" if s.data_root else "")
             + f" (task {s.task}, --mode {cfg.mode}, training labels: {s.label_type}"
             + (f", train subsampled to {s.subsample:g} with seed {cfg.seed}" if s.subsample < 1 else "") + ")",
             f"token lengths: {tok_note}"]
    if s.missing:
        lines.append("missing (no gold file): " + ", ".join(s.missing)
                     + " — see docs/datasets.md, 'Getting the data'")
    lines += s.notes
    for name, ds in splits.rows.items():
        sp = s.splits[name]
        teacher = (f"teacher label = gold {sp.teacher_accuracy:.2%} ({sp.teacher_agree:,}/{sp.teacher_labels:,})"
                   if sp.teacher_labels else "no teacher labels")
        lines.append(f"{name}: {sp.rows:,} rows; {teacher}; placeholder labels (teacher output did not "
                     f"parse) {sp.teacher_fallbacks:,}; rows excluded {sp.excluded:,}"
                     + (f" ({sp.excluded_why})" if sp.excluded else ""))

        def lengths(texts):
            return [len(ids) for ids in tokenizer(list(texts))["input_ids"]]

        lines.append(f"    {'tokens':<10}" + "".join(f"{'p' + str(q):>7}" for q in PERCENTILES)
                     + f"{'max':>7}   over the cap")
        lines.append(_length_row("input", lengths(prefix + x for x in ds["input"]), cfg.max_input_length))
        lines.append(_length_row("label", lengths(ds["label"]), cfg.max_target_length))
        rationales = [r for r in ds["rationale"] if r is not None]
        lines.append(_length_row("rationale", lengths(rationales), cfg.max_target_length)
                     + (f"   ({len(ds) - len(rationales):,} rows without one)" if len(rationales) < len(ds) else ""))
    return "\n".join(lines)
