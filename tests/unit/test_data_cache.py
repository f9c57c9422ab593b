"""The tokenized-data cache: a second run reuses it without reading or tokenizing; every input that
changes the result changes the key; entries appear whole or not at all."""
import os

import pytest
import torch

from cotmi_ds.config import load_config
from cotmi_ds.data import pipeline
from cotmi_ds.distributed import DistEnv
from cotmi_ds.errors import UsageError
from tests import dss_fixture as fx

ONE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
SMALL = dict(synthetic_train_size=48, synthetic_eval_size=6, scratch_vocab_size=96)


def _prepare(cache, **flags):
    return pipeline.prepare_data(load_config(data_cache_dir=str(cache), **{**SMALL, **flags}), ONE)


def _entries(cache):
    return sorted(p.name for p in (cache / "splits").iterdir())


def test_second_run_hits_without_reading_or_tokenizing(tmp_path, monkeypatch):
    first = _prepare(tmp_path)
    assert first.cache_status == "written"
    monkeypatch.setattr(pipeline, "build_splits", lambda *a, **k: pytest.fail("rows were built again"))
    monkeypatch.setattr(pipeline, "encode_split", lambda *a, **k: pytest.fail("tokenized again"))
    monkeypatch.setattr(pipeline, "train_sentencepiece", lambda *a, **k: pytest.fail("tokenizer trained again"))
    second = _prepare(tmp_path)
    assert second.cache_status == "hit"
    for name in ("train", "valid", "test"):
        assert second.splits[name].to_dict() == first.splits[name].to_dict()
    assert second.summary == first.summary
    assert second.tokenizer("predict: Tom has 3 apples.")["input_ids"] == \
        first.tokenizer("predict: Tom has 3 apples.")["input_ids"]


def test_each_input_that_changes_the_result_changes_the_key(tmp_path):
    _prepare(tmp_path, mode="mi")
    assert _prepare(tmp_path, mode="dss").cache_status == "hit"  # same encoding as mi
    n = len(_entries(tmp_path))
    for flags in ({"mode": "standard"}, {"mode": "single"}, {"max_input_length": 20}, {"max_target_length": 9},
                  {"seed": 1}, {"subsample": 0.5}, {"mode": "dss", "label_type": "llm"},
                  {"scratch_vocab_size": 80}):
        assert _prepare(tmp_path, **flags).cache_status == "written", flags
        n += 1
        assert len(_entries(tmp_path)) == n
    # distill = standard's encoding with the teacher's labels: the synthetic teacher's labels are
    # gold, but label_type is part of the key all the same.
    assert _prepare(tmp_path, mode="distill").cache_status == "written"


def test_a_changed_data_file_changes_the_key_and_the_seed_matters_only_when_subsampling(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    fx.write_cqa(data, n_train=40)
    flags = dict(dataset="cqa", data_root=str(data))
    first = _prepare(cache, **flags)
    assert first.summary.splits["train"].rows == 36 and first.cache_status == "written"
    assert _prepare(cache, seed=3, **flags).cache_status == "hit"
    assert _prepare(cache, seed=3, subsample=0.5, **flags).cache_status == "written"
    assert _prepare(cache, seed=4, subsample=0.5, **flags).cache_status == "written"
    test_file = data / "cqa" / "cqa_test.json"
    lines = test_file.read_text().splitlines()
    test_file.write_text("\n".join(lines[:-1] + [lines[-1].replace("Question", "Query")]) + "\n")
    os.utime(test_file, ns=(1, 1))
    changed = _prepare(cache, **flags)
    assert changed.cache_status == "written"
    assert changed.splits["test"]["input"][-1].startswith("Query") and first.splits["test"]["input"][-1].startswith("Question")


def test_a_bad_file_writes_nothing_to_the_cache(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    fx.write_cqa(data)
    (data / "cqa" / "cqa_train.json").write_text('{"id": 1,\n')
    with pytest.raises(UsageError, match=r"cqa_train\.json:1: not valid JSON"):
        _prepare(cache, dataset="cqa", data_root=str(data))
    assert not cache.exists()


def test_an_interrupted_build_leaves_no_entry(tmp_path, monkeypatch):
    real = pipeline.encode_split
    calls = []

    def fail_on_second_split(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_split", fail_on_second_split)
    with pytest.raises(RuntimeError):
        _prepare(tmp_path)
    assert list((tmp_path / "splits").iterdir()) == []
    monkeypatch.setattr(pipeline, "encode_split", real)
    assert _prepare(tmp_path).cache_status == "written"


def test_cache_can_be_switched_off(tmp_path):
    data = pipeline.prepare_data(load_config(data_cache=False, data_cache_dir=str(tmp_path), **SMALL), ONE)
    assert data.cache_status == "off" and list(tmp_path.iterdir()) == []
    assert len(data.splits["train"]) == 48


def test_tokenizer_identity_is_its_bytes(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "a")
    again = AutoTokenizer.from_pretrained(tmp_path / "a")
    again(["some text"] * 2, max_length=3, truncation=True, padding=True)  # use does not change it
    assert pipeline.tokenizer_identity(again, None) == pipeline.tokenizer_identity(tiny_tokenizer, None)
    assert pipeline.tokenizer_identity(tiny_tokenizer, b"model") != pipeline.tokenizer_identity(tiny_tokenizer, b"other")
    again.add_tokens(["<new>"])
    assert pipeline.tokenizer_identity(again, None) != pipeline.tokenizer_identity(tiny_tokenizer, None)


def test_a_given_tokenizer_is_part_of_the_key(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    first = _prepare(tmp_path / "cache", tokenizer=str(tmp_path / "tok"))
    assert first.cache_status == "written"
    assert _prepare(tmp_path / "cache", tokenizer=str(tmp_path / "tok")).cache_status == "hit"
    assert first.splits["train"][0]["label_ids"] == tiny_tokenizer(first.splits["train"][0]["label"])["input_ids"]


def test_an_unwritable_cache_dir_is_named(tmp_path, monkeypatch):
    def refuse(self, *args):  # what a read-only folder answers (the tests run as root, who may write anywhere)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pipeline.DataCache, "save_tokenizer_model", refuse)
    with pytest.raises(UsageError, match=r"--data_cache_dir .*cache: cannot write there \(Permission denied\)"):
        _prepare(tmp_path / "cache")


def test_tokenizer_identity_ignores_call_state_left_in_a_saved_copy(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer(["a b c d e f"] * 2, max_length=3, truncation=True, padding=True)
    tiny_tokenizer.save_pretrained(tmp_path / "used")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "used")
    assert pipeline.tokenizer_identity(reloaded, None) == pipeline.tokenizer_identity(tiny_tokenizer, None)
    reloaded.truncation_side = "left"  # this one changes what truncation keeps
    assert pipeline.tokenizer_identity(reloaded, None) != pipeline.tokenizer_identity(tiny_tokenizer, None)
