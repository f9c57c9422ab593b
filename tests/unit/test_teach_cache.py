"""The answer cache: what a killed writer can leave (a torn last line) is dropped and the next append
starts clean; any other damage is one line naming the file and line."""
from __future__ import annotations

import json

import pytest

from cotmi_ds.errors import UsageError
from cotmi_ds.teacher.cache import AnswerCache


def write(cache: AnswerCache, *keys: str) -> None:
    cache.open()
    for key in keys:
        cache.append({"key": key, "text": f"answer {key}"})
    cache.close()


def test_answers_read_back_by_key(tmp_path):
    cache = AnswerCache(tmp_path / "out" / "cache.jsonl")
    assert cache.read() == {}
    write(cache, "a", "b")
    write(cache, "c")
    assert list(cache.read()) == ["a", "b", "c"] and cache.read()["b"]["text"] == "answer b"


def test_a_torn_last_line_is_dropped_and_the_next_append_starts_clean(tmp_path):
    cache = AnswerCache(tmp_path / "cache.jsonl")
    write(cache, "a", "b")
    with open(cache.path, "ab") as f:
        f.write(b'{"key": "c", "text": "ans')  # killed mid-write
    assert list(cache.read()) == ["a", "b"] and cache.torn
    write(cache, "d")
    assert list(AnswerCache(cache.path).read()) == ["a", "b", "d"]


def test_a_last_line_complete_but_for_its_newline_is_kept(tmp_path):
    cache = AnswerCache(tmp_path / "cache.jsonl")
    write(cache, "a")
    with open(cache.path, "ab") as f:
        f.write(json.dumps({"key": "b", "text": "x"}).encode())
    assert list(cache.read()) == ["a", "b"] and not cache.torn
    write(cache, "c")
    assert list(AnswerCache(cache.path).read()) == ["a", "b", "c"]


@pytest.mark.parametrize("bad", [b'{"key": "x", "te\n', b'[1, 2]\n', b'{"text": "no key"}\n'])
def test_damage_before_the_last_line_is_an_error_naming_the_line(tmp_path, bad):
    cache = AnswerCache(tmp_path / "cache.jsonl")
    write(cache, "a")
    with open(cache.path, "ab") as f:
        f.write(bad)
    write(cache, "b")
    with pytest.raises(UsageError, match=rf"^{cache.path}:2: not an answer record"):
        cache.read()
