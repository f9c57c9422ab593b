"""Benchmark token lengths (cotmi_ds/data/lengths.py): measured from the data as the trainer tokenizes
it, kept jointly in the shipped histograms, drawn back from them, and the fallback says why."""
import pytest

from cotmi_ds.data.datasets import DSS_DATASETS
from cotmi_ds.data.encode import encode_split
from cotmi_ds.data.lengths import BIN, benchmark_lengths, draw, histogram, measure, shipped


def test_measured_lengths_are_the_trainers_tokens(dss_root, tiny_tokenizer):
    from cotmi_ds.config import load_config
    from cotmi_ds.data.splits import build_splits

    lengths, splits = measure("svamp", str(dss_root), tiny_tokenizer)
    assert splits == "train"
    train = build_splits(load_config(dataset="svamp", data_root=str(dss_root)), tiny_tokenizer.eos_token).rows["train"]
    encoded = encode_split(train, tiny_tokenizer, 1024, 256)
    assert len(lengths) == len(train) == 720
    for k in (0, 123, 719):
        assert lengths[k] == tuple(len(encoded[c][k]) for c in ("pred_input_ids", "label_ids", "expl_input_ids",
                                                                   "rationale_ids"))


def test_a_histogram_keeps_the_joint_lengths_and_draws_them_back():
    rows = [(40, 3, 41, 30), (41, 3, 42, 31), (90, 5, 91, 60), (13, 2, 14, 7)] * 25
    bins = histogram(rows)
    assert sum(b[4] for b in bins) == 100 and len(bins) == 3  # the first two share a bin
    drawn = draw(bins, 2000, seed=0)
    for pred, label, expl, rationale in drawn:
        key = (pred // BIN, label, expl - pred, rationale // BIN)
        assert key in {(10, 3, 1, 7), (22, 5, 1, 15), (3, 2, 1, 1)}
        assert (label == 5) == (pred >= 88)  # joint: the long inputs come with their own labels
    share = sum(d[1] == 5 for d in drawn) / len(drawn)
    assert share == pytest.approx(0.25, abs=0.04)  # its share of the rows


@pytest.mark.parametrize("name", DSS_DATASETS)
def test_every_benchmark_has_a_shipped_histogram_that_names_its_tokenizer(name):
    hist = shipped(name)
    assert hist["dataset"] == name and hist["bin"] == BIN and "tokenizer" in hist["tokenizer"]
    assert sum(b[4] for b in hist["bins"]) >= 720


def test_without_a_tokenizer_the_histogram_answers_and_says_why():
    lengths, source = benchmark_lengths("cqa", None, "./no/such/tokenizer")
    assert len(lengths) == sum(b[4] for b in shipped("cqa")["bins"])
    assert source.startswith("the shipped cqa histogram (8,766 rows of train")
    assert "); --tokenizer ./no/such/tokenizer: " in source  # why the tokenizer could not be used
