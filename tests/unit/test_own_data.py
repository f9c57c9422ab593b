"""Your own task's data: every format read through datasets into the same checked rows, the folder
layouts, the task kind, and every bad input as one line naming the file, line (or row) and field."""
import csv
import json
import subprocess
import sys

import pytest

from cotmi_ds.data.own import OwnSource, format_choices, locate, read_split, resolve_task
from cotmi_ds.errors import UsageError
from tests.conftest import REPO

ROWS = [
    {"input": "Is the sky blue?", "label": "yes", "rationale": "It scatters blue light.", "choices": ["yes", "no"]},
    {"input": "Two, then three more?", "label": "yes", "rationale": None, "choices": ["no", "yes"]},
    {"input": "Is ice hot?\nThink.", "label": "no", "rationale": "Ice is frozen, so cold.", "choices": ["yes", "no"]},
]
EXPECTED = [dict(r, llm_label=None) for r in ROWS]


def write_jsonl(path, rows, blank_after=()):
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
            if i in blank_after:
                f.write("\n")
    return path


def write_csv(path, rows, columns=("input", "label", "rationale", "choices")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow(["" if row.get(c) is None else json.dumps(row[c]) if c == "choices" else row[c]
                        for c in columns])
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read(path, task=None, split="train"):
    return read_split(locate(str(path)), split, task)


# --- every format, the same rows ------------------------------------------------------------

@pytest.mark.parametrize("name, write", [
    ("data.jsonl", write_jsonl),
    ("data.json", lambda p, rows: p.write_text(json.dumps(rows))),  # a JSON list of objects
    ("data.csv", write_csv),
    ("data.parquet", write_parquet),
])
def test_every_file_format_gives_the_same_checked_rows(tmp_path, name, write):
    write(tmp_path / name, ROWS)
    split = read(tmp_path / name, task="choice")
    assert split.rows == EXPECTED
    assert split.present == ("rationale", "choices") and split.ignored == ()
    assert split.missing("rationale") == 2 and split.missing("choices") is None


def test_csv_cells_stay_text_and_empty_optional_cells_are_absent(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"input": "a, b", "label": "007", "rationale": ""},
                                          {"input": "NA", "label": "1.50", "rationale": "null"}],
                     columns=("input", "label", "rationale"))
    assert [(r["input"], r["label"], r["rationale"]) for r in read(path).rows] == \
        [("a, b", "007", None), ("NA", "1.50", "null")]


def test_save_to_disk_folders_and_unknown_fields(tmp_path):
    from datasets import Dataset, DatasetDict

    extra = [dict(r, source="web") for r in ROWS]
    DatasetDict({"train": Dataset.from_list(extra), "validation": Dataset.from_list(extra[:1])}).save_to_disk(
        str(tmp_path / "dict"))
    source = locate(str(tmp_path / "dict"))
    assert source.saved and sorted(source.files) == ["train", "valid"]
    train = read_split(source, "train")
    assert train.rows == EXPECTED and train.ignored == ("source",)
    assert read_split(source, "valid").rows == EXPECTED[:1]
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert list(locate(str(tmp_path / "one")).files) == ["train"]
    assert read(tmp_path / "one").rows == EXPECTED


def test_a_folder_of_split_files_with_a_manifest(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_csv(tmp_path / "validation.csv", ROWS[:2])
    write_parquet(tmp_path / "test.parquet", ROWS[2:])
    (tmp_path / "notes.txt").write_text("not a split")
    (tmp_path / "manifest.json").write_text(json.dumps({"task": "choice", "name": "sky"}))
    source = locate(str(tmp_path))
    assert source.files == {"train": tmp_path / "train.jsonl", "valid": tmp_path / "validation.csv",
                            "test": tmp_path / "test.parquet"}
    assert (source.task, source.name) == ("choice", "sky")
    assert source.input_files() == [tmp_path / "train.jsonl", tmp_path / "validation.csv",
                                    tmp_path / "test.parquet", tmp_path / "manifest.json"]
    assert [len(read_split(source, s).rows) for s in ("train", "valid", "test")] == [3, 2, 1]
    assert resolve_task(source, None) == "choice" and resolve_task(source, "exact") == "exact"


def test_readable_names():
    assert OwnSource(REPO / "tests" / "x" / "train.jsonl", {}).name == "x"
    assert OwnSource(REPO / "tests" / "mytask.csv", {}).name == "mytask"
    assert OwnSource(REPO / "tests", {}, manifest={"name": " arith "}).name == "arith"


def test_format_choices_as_commonsenseqa_lists_them():
    assert format_choices("Where?", ["home", "shop"]) == "Where?\nAnswer Choices:\n(a) home\n(b) shop"
    assert format_choices("Where?", None) == "Where?"


def test_the_reader_needs_neither_datasets_nor_torch_to_find_files(tmp_path):
    """The CLI locates the files before its heavy imports."""
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    code = ("import sys; from cotmi_ds.data.own import locate; locate(sys.argv[1]); "
            "assert not {'datasets', 'torch'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=REPO, timeout=60)


# --- bad input: one line naming the file, line and field; nothing written ----------------------

def jsonl(*lines):
    return lambda p: p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


OK = json.dumps({"input": "q", "label": "a"})

BAD_FILES = [
    # name, write(path), task, message after the path
    ("t.jsonl", jsonl(OK, "", json.dumps({"label": "a"})), None, ":3: missing field 'input'"),
    ("t.jsonl", jsonl(OK, json.dumps({"input": "q", "label": 3})), None,
     ":2: field 'label' must be a string, got int 3 (write it as \"3\")"),
    ("t.jsonl", jsonl(json.dumps({"input": "q", "label": " "})), None, ":1: field 'label' is empty"),
    ("t.jsonl", jsonl(OK, json.dumps({"input": "q", "label": "a", "choices": "a|b"})), None,
     ":2: field 'choices' must be a list of non-empty strings, got 'a|b'"),
    ("t.jsonl", jsonl(json.dumps({"input": "q", "label": "a", "choices": ["a", 2]})), None,
     ":1: field 'choices' must be a list of non-empty strings, got ['a', 2]"),
    ("t.jsonl", jsonl(OK, OK, json.dumps({"input": "q", "label": "c", "choices": ["a", "b"]})), "choice",
     ":3: label 'c' is not one of its choices ['a', 'b']"),
    ("t.jsonl", jsonl(OK, '{"input": "q\\ud800", "label": "a"}'), None,
     ":2: field 'input' holds text that is not valid Unicode ('\\ud800': a lone surrogate)"),
    ("t.jsonl", jsonl(OK, json.dumps({"input": "q", "label": "a", "meta": [[[[[]]]]] * 2}),
                      '{"input": "q", "label": "a", "meta": ' + "[" * 50 + "]" * 50 + "}",  # Arrow reads 50
                      '{"input": "q", "label": "a", "meta": ' + "[" * 100 + "]" * 100 + "}"), None,
     ":4: field 'meta' is nested more than 60 levels deep"),
    ("t.jsonl", jsonl(OK, '{"input": "q", "label": "a", "meta": ' + "[" * 5000 + "]" * 5000 + "}"), None,
     ":2: nested too deeply to read"),
    ("t.jsonl", jsonl(json.dumps({"input": {"text": "q"}, "label": "a"})), None,
     ":1: field 'input' must be a string, got dict {'text': 'q'}"),
    ("t.jsonl", jsonl(OK, '{"input": "q", "label": }'), None, ":2: not valid JSON (Expecting value at column 25)"),
    ("t.jsonl", jsonl(OK, "[1, 2]"), None, ":2: expected a JSON object, got list"),
    ("t.jsonl", jsonl(json.dumps({"input": "q", "label": "( 3 + 4 ) / 2"}),
                      json.dumps({"input": "q", "label": "twelve"})), "numeric",
     ":2: field 'label' 'twelve' is not a number or arithmetic expression"),
    ("t.jsonl", jsonl(json.dumps({"question": "q", "answer": "a"})), None,
     ": no 'input' field (its fields: question, answer); every row needs 'input' and 'label'"),
    ("t.jsonl", jsonl(), None, ": empty split (0 rows)"),
    ("t.json", lambda p: p.write_text("[]"), None, ": empty split (0 rows)"),
    ("t.json", lambda p: p.write_text(json.dumps([{"input": "q", "label": "a"}, {"input": "q"}])), None,
     ": row 2: missing field 'label'"),
    ("t.jsonl", lambda p: p.write_bytes(OK.encode() + b'\n{"input": "\xff", "label": "a"}\n'), None,
     ":2: not UTF-8 text (byte 0xff at offset 40); save it as UTF-8"),
    ("t.csv", lambda p: p.write_text("input,label\n"), None, ": empty split (0 rows)"),
    ("t.csv", lambda p: p.write_text(""), None, ": empty split (0 rows)"),
    ("t.csv", lambda p: p.write_text('input,label\n"two\nlines",a\nq,a,extra\n'), None,
     ":4: 3 cells, but the header has 2 (input,label); quote cells that hold a comma"),
    ("t.csv", lambda p: p.write_text("input,label\nq,a,extra\n"), None, ":2: 3 cells, but the header has 2"),
    ("t.csv", lambda p: p.write_text('input,label,label\nq,a,b\n'), None, ":1: column 'label' appears twice"),
    ("t.csv", lambda p: p.write_text('input,label,choices\nq,a,"[""a"", ""b""]"\n"x\ny",c,a|b\n'), None,
     ":3: field 'choices' must be a JSON list of strings in a CSV cell"),
    ("t.csv", lambda p: p.write_text('input,label\nq,a\n"two\nlines",\n'), None, ":3: field 'label' is empty"),
    ("t.csv", lambda p: p.write_bytes(b"input,label\nq,a\n\xfe,b\n"), None, ":3: not UTF-8 text (byte 0xfe"),
    ("t.parquet", lambda p: write_parquet(p, [{"input": "q", "label": 1}]), None,
     ": row 1: field 'label' must be a string, got int 1"),
    ("t.parquet", lambda p: p.write_bytes(b"not parquet"), None, ": cannot be read as Parquet (Parquet magic bytes"),
]


@pytest.mark.parametrize("name, write, task, message", BAD_FILES, ids=[m for *_, m in BAD_FILES])
def test_bad_rows_are_one_line_naming_file_line_and_field(tmp_path, name, write, task, message):
    path = tmp_path / name
    write(path)
    before = path.read_bytes()
    with pytest.raises(UsageError) as e:
        read(path, task)
    text = str(e.value)
    assert text.startswith(str(path) + message), text
    assert "\n" not in text and len(text) < 300
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_parquet_text_that_is_not_utf8_names_its_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = pa.array([b"fine", b"\xed\xa0\x80"], pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"input": bad, "label": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(UsageError, match=r"t\.parquet: row 2: field 'input' holds text that is not valid UTF-8$"):
        read(tmp_path / "t.parquet")


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "--dataset {d}/nope: no such file or folder"),
    (lambda d: (d / "nope").write_text("x"), "--dataset {d}/nope: unknown format '(no extension)'"),
    (lambda d: ((d / "nope").mkdir(), (d / "nope" / "data.jsonl").write_text(OK)),
     "--dataset {d}/nope: no split files in this folder (expected train, valid or validation, test"),
    (lambda d: ((d / "nope").mkdir(), (d / "nope" / "valid.jsonl").write_text(OK),
                (d / "nope" / "validation.csv").write_text("input,label\nq,a\n")),
     "--dataset {d}/nope: two files for the valid split (valid.jsonl, validation.csv); keep one"),
    (lambda d: ((d / "nope").mkdir(), (d / "nope" / "train.jsonl").write_text(OK),
                (d / "nope" / "manifest.json").write_text('{"task": "regression"}')),
     "{d}/nope/manifest.json: task 'regression' is not one of: choice, exact, numeric"),
    (lambda d: ((d / "nope").mkdir(), (d / "nope" / "train.jsonl").write_text(OK),
                (d / "nope" / "manifest.json").write_text('{"task": ')),
     "{d}/nope/manifest.json:1: not valid JSON"),
    (lambda d: ((d / "nope").mkdir(), (d / "nope" / "dataset_dict.json").write_text('{"splits": ["dev"]}')),
     "{d}/nope: split 'dev' is not one of: train, valid, validation, test"),
    (lambda d: ((d / "nope").mkdir(),
                (d / "nope" / "dataset_dict.json").write_text('{"splits": ["valid", "validation"]}')),
     "{d}/nope: has both a valid and a validation split; keep one"),
])
def test_bad_paths_and_folders(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UsageError) as e:
        locate(str(tmp_path / "nope"))
    assert str(e.value).startswith(message.format(d=tmp_path)), str(e.value)


def test_the_task_comes_from_the_flag_or_the_manifest(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    source = locate(str(tmp_path / "train.jsonl"))
    with pytest.raises(UsageError, match=r"train\.jsonl: give --task choice, exact or numeric \(how answers"):
        resolve_task(source, None)
    with pytest.raises(UsageError, match="--task 'math' is not one of: choice, exact, numeric"):
        resolve_task(source, "math")
    assert resolve_task(source, "numeric") == "numeric"
