"""Two-task batches: the same examples as a label task and a rationale task, right-padded."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets at padded positions: skipped by the CE, as in HF


def pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the matching 0/1 mask (from lengths, not from the pad value)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def collate(rows: dict[str, list], pad_id: int, with_rationale: bool,
            target_column: str = "label_ids") -> dict[str, torch.Tensor]:
    """``rows`` is a column dict (what ``Dataset.__getitem__`` returns for a list of indices).
    ``target_column``: what the label pass learns (``Mode.target_column``; `single`: ``target_ids``)."""
    batch = {}
    batch["pred_input_ids"], batch["pred_attention_mask"] = pad(rows["pred_input_ids"], pad_id)
    batch["labels"] = pad(rows[target_column], IGNORE_INDEX)[0]
    if with_rationale:
        batch["expl_input_ids"], batch["expl_attention_mask"] = pad(rows["expl_input_ids"], pad_id)
        batch["rationale_labels"] = pad(rows["rationale_ids"], IGNORE_INDEX)[0]
    return batch


def row_lengths(split, with_rationale: bool, target_column: str = "label_ids") -> list[int]:
    """Tokens each row of a tokenized split adds to a batch (its inputs and targets of both tasks):
    what length grouping sorts by. Read through Arrow, without materialising the token lists."""
    import pyarrow.compute as pc

    columns = ["pred_input_ids", target_column] + (["expl_input_ids", "rationale_ids"] if with_rationale else [])
    table = split.with_format("arrow")
    total = None
    for name in columns:
        n = pc.list_value_length(table[name])
        total = n if total is None else pc.add(total, n)
    return total.to_pylist()


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens the model reads and predicts (encoder inputs + decoder targets)."""
    n = int(batch["pred_attention_mask"].sum()) + int(batch["labels"].ne(IGNORE_INDEX).sum())
    if "expl_attention_mask" in batch:
        n += int(batch["expl_attention_mask"].sum()) + int(batch["rationale_labels"].ne(IGNORE_INDEX).sum())
    return n
