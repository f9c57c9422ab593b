"""Examples -> token ids, through HF datasets (batched map), with only the columns the mode trains on.

Columns written (besides the text columns, which are kept):
- ``pred_input_ids``: the label task's input, ``"predict: " + x`` (dss/mi) or plain ``x``;
- ``label_ids``: the label, eos-terminated (the gold label of valid/test is what evaluation scores);
- dss/mi only: ``expl_input_ids`` (``"explain: " + x``) and ``rationale_ids`` (a row without a
  rationale, possible in valid and test of your own data, gets an empty one);
- single only: ``target_ids``, the rationale, ``SINGLE_SEPARATOR`` and the label as one target.
  When it is longer than ``max_target_length`` the rationale is cut, never the label.
"""
from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from cotmi_ds.modes import MODES, SINGLE_SEPARATOR, Mode

LABEL_PREFIX = "predict: "
RATIONALE_PREFIX = "explain: "


def encoder(tokenizer: PreTrainedTokenizerBase, max_input_length: int, max_target_length: int, mode: Mode):
    """The batched function ``Dataset.map`` runs."""
    def ids(texts, max_len, special=True):
        return tokenizer(texts, max_length=max_len, truncation=max_len is not None,
                         add_special_tokens=special)["input_ids"]

    def encode(batch):
        x, rationales = batch["input"], [r or "" for r in batch["rationale"]]
        if mode.prefixed:
            out = {"pred_input_ids": ids([LABEL_PREFIX + t for t in x], max_input_length)}
        else:
            out = {"pred_input_ids": ids(x, max_input_length)}
        out["label_ids"] = ids(batch["label"], max_target_length)
        if mode.rationale_pass:
            out["expl_input_ids"] = ids([RATIONALE_PREFIX + t for t in x], max_input_length)
            out["rationale_ids"] = ids(rationales, max_target_length)
        if mode.single_target:
            # "r So the answer is y</s>": the tail is tokenized on its own (a word boundary, so
            # sentencepiece gives the pieces it would give in place) and always kept whole.
            heads = ids(rationales, None, special=False)
            tails = ids([SINGLE_SEPARATOR.lstrip() + y for y in batch["label"]], max_target_length)
            out["target_ids"] = [h[: max(0, max_target_length - len(t))] + t for h, t in zip(heads, tails)]
        return out

    return encode


def encode_split(rows: list[dict[str, str]] | Dataset, tokenizer: PreTrainedTokenizerBase,
                 max_input_length: int, max_target_length: int, mode: Mode = MODES["mi"],
                 cache_file: str | None = None) -> Dataset:
    """Tokenize one split. With ``cache_file`` the result is written there as Arrow (memory-mapped
    when read back); without, it stays in memory."""
    ds = rows if isinstance(rows, Dataset) else Dataset.from_list(rows)
    fn = encoder(tokenizer, max_input_length, max_target_length, mode)
    if cache_file is None:
        return ds.map(fn, batched=True, desc="tokenizing", keep_in_memory=True)
    return ds.map(fn, batched=True, desc="tokenizing", cache_file_name=cache_file, load_from_cache_file=False)
