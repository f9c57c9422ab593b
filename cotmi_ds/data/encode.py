"""Examples -> token ids for both tasks, through HF datasets (batched map)."""
from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

LABEL_PREFIX = "predict: "
RATIONALE_PREFIX = "explain: "


def encode_split(rows: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
                 max_input_length: int, max_target_length: int) -> Dataset:
    """Columns: the raw text plus ``pred_input_ids`` / ``expl_input_ids`` (the two prefixed inputs),
    ``label_ids`` and ``rationale_ids`` (targets, eos-terminated, truncated)."""

    def encode(batch):
        def ids(texts, max_len):
            return tokenizer(texts, max_length=max_len, truncation=True)["input_ids"]
        return {
            "pred_input_ids": ids([LABEL_PREFIX + x for x in batch["input"]], max_input_length),
            "expl_input_ids": ids([RATIONALE_PREFIX + x for x in batch["input"]], max_input_length),
            "label_ids": ids(batch["label"], max_target_length),
            "rationale_ids": ids(batch["rationale"], max_target_length),
        }

    ds = Dataset.from_list(rows)
    return ds.map(encode, batched=True, desc="tokenizing", keep_in_memory=True)
