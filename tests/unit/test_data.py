"""The embedded dataset, tokenizer and batching (the batch order: test_sampler.py)."""
from collections import Counter

from cotmi_ds.data.collate import IGNORE_INDEX, collate, count_tokens, row_lengths
from cotmi_ds.data.encode import encode_split
from cotmi_ds.data.synthetic import synthetic_splits


def test_synthetic_is_deterministic_disjoint_and_not_guessable():
    a, b = synthetic_splits(500, 100, seed=3), synthetic_splits(500, 100, seed=3)
    assert a == b
    assert synthetic_splits(500, 100, seed=4)["test"] != a["test"]
    inputs = {name: {r["input"] for r in rows} for name, rows in a.items()}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["valid"]
    assert not inputs["valid"] & inputs["test"]
    # valid/test do not move when the training size changes.
    assert synthetic_splits(200, 100, seed=3)["test"] == a["test"]
    labels = Counter(r["label"] for r in a["train"])
    assert labels.most_common(1)[0][1] / len(a["train"]) < 0.02
    for r in a["train"]:
        assert r["label"].startswith("( ") and r["label"].endswith(" )")
        assert r["rationale"].endswith(".")


def test_tokenizer_round_trips_labels_exactly(tiny_tokenizer):
    rows = synthetic_splits(50, 50, seed=9)["test"]
    for r in rows:
        ids = tiny_tokenizer(r["label"])["input_ids"]
        assert ids[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.unk_token_id not in ids
        assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == r["label"]


def test_tokenizer_saves_and_loads_with_from_pretrained(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "predict: Tom has 12 apples. ( 12 + 7 )"
    assert again(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_collate_pads_inputs_and_masks_targets(tiny_tokenizer):
    ds = encode_split(synthetic_splits(6, 1, 0)["train"], tiny_tokenizer, 1024, 256)
    rows = ds[[0, 1, 2]]
    batch = collate(rows, tiny_tokenizer.pad_token_id, with_rationale=True)
    for i in range(3):
        n = len(rows["pred_input_ids"][i])
        assert batch["pred_attention_mask"][i].sum() == n
        assert batch["pred_input_ids"][i, :n].tolist() == rows["pred_input_ids"][i]
        m = len(rows["label_ids"][i])
        assert batch["labels"][i, :m].tolist() == rows["label_ids"][i]
        assert (batch["labels"][i, m:] == IGNORE_INDEX).all()
    assert count_tokens(batch) == sum(len(rows[c][i]) for c in ("pred_input_ids", "label_ids", "expl_input_ids",
                                                                   "rationale_ids") for i in range(3))
    label_only = collate(rows, tiny_tokenizer.pad_token_id, with_rationale=False)
    assert "expl_input_ids" not in label_only and "rationale_labels" not in label_only


def test_row_lengths_are_each_rows_tokens_in_a_batch_through_a_selection(tiny_tokenizer):
    ds = encode_split(synthetic_splits(30, 1, 0)["train"], tiny_tokenizer, 1024, 256)
    part = ds.train_test_split(test_size=0.5, seed=0)["train"]  # an indices mapping, as --subsample makes
    both = row_lengths(part, with_rationale=True)
    for i in range(len(part)):
        one = collate(part[[i]], tiny_tokenizer.pad_token_id, with_rationale=True)
        assert both[i] == count_tokens(one)
    labels = row_lengths(part, with_rationale=False)
    assert labels == [len(a) + len(b) for a, b in zip(part["pred_input_ids"], part["label_ids"])]


def test_truncation_caps_inputs_and_targets(tiny_tokenizer):
    ds = encode_split(synthetic_splits(20, 1, 0)["train"], tiny_tokenizer, 10, 5)
    assert max(len(x) for x in ds["pred_input_ids"]) == 10
    assert max(len(x) for x in ds["rationale_ids"]) == 5
