"""The five modes: inputs and targets each one encodes, which passes run, how the parts combine."""
import pytest
import torch

from cotmi_ds.config import load_config
from cotmi_ds.data.collate import IGNORE_INDEX, collate
from cotmi_ds.data.encode import LABEL_PREFIX, encode_split
from cotmi_ds.data.synthetic import synthetic_splits
from cotmi_ds.model.student import DistillModel
from cotmi_ds.modes import MODES, SINGLE_SEPARATOR, combine, generation_length, label_from_generation


def _rows(n=4):
    return synthetic_splits(n, 1, 0)["train"]


@pytest.mark.parametrize("mode", ["standard", "distill", "single"])
def test_label_only_modes_encode_no_rationale_task_and_no_prefix(mode, tiny_tokenizer):
    rows = _rows()
    ds = encode_split(rows, tiny_tokenizer, 1024, 256, mode=MODES[mode])
    assert "expl_input_ids" not in ds.column_names and "rationale_ids" not in ds.column_names
    assert ds[0]["pred_input_ids"] == tiny_tokenizer(rows[0]["input"])["input_ids"]
    assert ds[0]["label_ids"] == tiny_tokenizer(rows[0]["label"])["input_ids"]
    assert ("target_ids" in ds.column_names) == (mode == "single")


@pytest.mark.parametrize("mode", ["dss", "mi"])
def test_multi_task_modes_encode_both_prefixed_tasks(mode, tiny_tokenizer):
    rows = _rows()
    ds = encode_split(rows, tiny_tokenizer, 1024, 256, mode=MODES[mode])
    assert ds[0]["pred_input_ids"] == tiny_tokenizer(LABEL_PREFIX + rows[0]["input"])["input_ids"]
    assert ds[0]["expl_input_ids"] == tiny_tokenizer("explain: " + rows[0]["input"])["input_ids"]
    assert ds[0]["rationale_ids"] == tiny_tokenizer(rows[0]["rationale"])["input_ids"]


def test_single_target_is_rationale_separator_label_and_truncation_spares_the_label(tiny_tokenizer):
    rows = _rows()
    ds = encode_split(rows, tiny_tokenizer, 1024, 256, mode=MODES["single"])
    text = tiny_tokenizer.decode(ds[0]["target_ids"], skip_special_tokens=True)
    assert text == rows[0]["rationale"] + SINGLE_SEPARATOR + rows[0]["label"]
    assert ds[0]["target_ids"][-1] == tiny_tokenizer.eos_token_id
    assert label_from_generation(text, MODES["single"]) == rows[0]["label"]
    cap = max(len(tiny_tokenizer(SINGLE_SEPARATOR.lstrip() + r["label"])["input_ids"]) for r in rows) + 2
    assert all(len(ids) > cap for ids in ds["target_ids"])
    short = encode_split(rows, tiny_tokenizer, 1024, cap, mode=MODES["single"])
    for row, ids in zip(rows, short["target_ids"]):
        assert len(ids) <= cap
        cut = tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert cut.endswith(SINGLE_SEPARATOR + row["label"]) and label_from_generation(cut, MODES["single"]) == row["label"]


def test_single_label_is_read_after_the_last_separator():
    single = MODES["single"]
    assert label_from_generation("a. So the answer is b. So the answer is ( 1 + 2 )", single) == "( 1 + 2 )"
    assert label_from_generation("no separator written", single) == ""
    assert label_from_generation("So the answer is", single) == ""
    assert label_from_generation("text So the answer is x", MODES["dss"]) == "text So the answer is x"
    assert generation_length(single, 64, 256) == 256 and generation_length(MODES["mi"], 64, 256) == 64
    # Targets are cut to --max_target_length tokens: a longer generation could never be right.
    assert generation_length(single, 512, 256) == 256 and generation_length(MODES["mi"], 100_000, 256) == 256


def test_combine_weights_per_mode():
    parts = {"label_ce": torch.tensor(2.0), "rationale_ce": torch.tensor(4.0), "mi": torch.tensor(10.0),
             "single_ce": torch.tensor(3.0)}
    assert combine(parts, MODES["standard"], 0.3, 0.7).item() == 2.0
    assert combine(parts, MODES["distill"], 0.3, 0.7).item() == 2.0
    assert combine(parts, MODES["single"], 0.3, 0.7).item() == 3.0
    assert combine(parts, MODES["dss"], 0.3, 0.7).item() == pytest.approx(0.3 * 2 + 0.7 * 4)
    assert combine(parts, MODES["mi"], 0.3, 0.7).item() == pytest.approx(0.3 * 2 + 0.7 * 4 + 0.7 * 10)


@pytest.mark.parametrize("loss", ["fused", "reference"])
@pytest.mark.parametrize("mode", ["standard", "distill", "single"])
def test_label_only_modes_run_one_forward_on_a_label_only_batch(mode, loss, tiny_t5, tiny_tokenizer):
    m = MODES[mode]
    ds = encode_split(_rows(), tiny_tokenizer, 1024, 64, mode=m)
    batch = collate(ds[[0, 1, 2]], tiny_tokenizer.pad_token_id, m.rationale_pass, m.target_column)
    assert set(batch) == {"pred_input_ids", "pred_attention_mask", "labels"}
    target = ds[0][m.target_column]
    assert batch["labels"][0, :len(target)].tolist() == target
    assert (batch["labels"][0, len(target):] == IGNORE_INDEX).all()
    model = DistillModel(tiny_t5, load_config(mode=mode, loss=loss))
    calls = []  # one decoder pass per task (the fused loss calls encoder and decoder itself)
    handle = tiny_t5.decoder.register_forward_hook(lambda *a: calls.append(1))
    parts = model(batch)
    handle.remove()
    assert len(calls) == 1
    assert set(parts) == {m.label_part, "total"} and parts["total"] is parts[m.label_part]
    expected = tiny_t5(input_ids=batch["pred_input_ids"], attention_mask=batch["pred_attention_mask"],
                       labels=batch["labels"]).loss
    assert parts[m.label_part].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["fused", "reference"])
def test_multi_task_modes_run_two_forwards(loss, tiny_t5, tiny_tokenizer):
    ds = encode_split(_rows(), tiny_tokenizer, 1024, 64, mode=MODES["dss"])
    batch = collate(ds[[0, 1]], tiny_tokenizer.pad_token_id, True)
    calls = []
    handle = tiny_t5.decoder.register_forward_hook(lambda *a: calls.append(1))
    parts = DistillModel(tiny_t5, load_config(mode="dss", loss=loss))(batch)
    handle.remove()
    assert len(calls) == 2 and set(parts) == {"label_ce", "rationale_ce", "total"}


def test_the_labels_a_mode_trains_on_come_from_the_mode():
    from types import SimpleNamespace

    from cotmi_ds.modes import label_type_of

    implied = {m: label_type_of(SimpleNamespace(mode=m, label_type=None)) for m in MODES}
    assert implied == {"standard": "gt", "distill": "llm", "single": "gt", "dss": "gt", "mi": "gt"}
    assert label_type_of(SimpleNamespace(mode="dss", label_type="llm")) == "llm"
