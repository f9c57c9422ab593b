"""The bounded readers of files.py: what people's JSON and YAML may hold, and the one line naming
the file and line when it holds something no reader downstream could take."""
import pytest

from cotmi_ds.errors import UsageError
from cotmi_ds.files import MAX_DEPTH, read_json, read_yaml


def _refused(read, path) -> str:
    with pytest.raises(UsageError) as e:
        read(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_json_surrogate_pairs_are_characters_and_an_unpaired_one_is_named_by_its_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"ok": "\\ud83d\\ude00 and \\\\ud800 (an escaped backslash, then text)",\n'
                    ' "also": "\\ud83d\\ude00",\n "bad": "x\\udc00y"}')
    assert _refused(read_json, path) == (f"{path}:3: text with an unpaired surrogate escape (\\udc00), which is "
                                         "no character and cannot be written as UTF-8; remove it")
    path.write_text('{"ok": "\\ud83d\\ude00 and \\\\ud800"}')
    assert read_json(path) == {"ok": "\U0001F600 and \\ud800"}


def test_yaml_escapes_every_surrogate_alone(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text('a: 1\nb: "\\ud83d\\ude00"\n')  # YAML does not join the pair
    assert _refused(read_yaml, path).startswith(f"{path}:2: text with an unpaired surrogate escape")


def test_depth_is_bounded_whatever_the_parser_would_take(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert read_json(path) is not None
    path.write_text("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert _refused(read_json, path) == f"{path}: nested deeper than {MAX_DEPTH} levels"
    path = tmp_path / "a.yaml"
    path.write_text("a:\n" + "".join("  " * i + "- \n" for i in range(1, 70)))
    assert _refused(read_yaml, path) == f"{path}: nested deeper than {MAX_DEPTH} levels"


def test_characters_yaml_refuses_are_one_line_with_their_line(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("a: 1\nmodel: \x1f\n")
    assert _refused(read_yaml, path) == f"{path}:2: not valid YAML: special characters are not allowed (character '\\x1f')"


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    import errno
    import os

    from cotmi_ds.files import write_text_atomic

    path = tmp_path / "status.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_text_atomic(path, "new", durable=True)
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"] and path.read_text() == "old"
