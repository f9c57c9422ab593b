"""The DSS benchmarks: teacher parsers on real completions, loaders on fixtures and on the real
files, DSS's splits, label_type and the dataset-size sweep, and every bad input."""
import json

import pytest

from cotmi_ds.config import load_config
from cotmi_ds.data.datasets import (DSS_DATASETS, Parsed, load_split, parse_anli, parse_cqa, parse_esnli,
                                      parse_svamp, resolve_data_root)
from cotmi_ds.data.splits import build_splits
from cotmi_ds.errors import UsageError
from tests import dss_fixture as fx


# --- parsers: real completions, the ones that parse and the ones that do not ---------------------

@pytest.mark.parametrize("parse, output, expected", [
    (parse_cqa, fx.CQA_OK, Parsed("The answer must be something that has to do with the above problem. Of the "
                                  "above choices, only math problem has to do with the above problem.",
                                  "math problem", False)),
    # "So the answer is one of these four." has no (x) marker: the placeholder label ' '.
    (parse_cqa, fx.CQA_NO_CHOICE, Parsed("The answer must be something that holds shirts. Of the above choices, "
                                         "only suitcase, garment bag, drawer, and dresser hold shirts.", " ", True)),
    (parse_cqa, "No verdict at all.", Parsed(" ", " ", True)),
    (parse_svamp, fx.SVAMP_OK, Parsed("Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. "
                                      "84 / 2 = 42.", "(84 / 2)", False)),
    # The completion was cut inside the equation: no closing parenthesis, placeholder label.
    (parse_svamp, fx.SVAMP_UNCLOSED, Parsed(fx.SVAMP_UNCLOSED.split(" The answer is")[0], " ", True)),
    (parse_svamp, fx.SVAMP_NO_ANSWER, Parsed(" ", " ", True)),
    (parse_svamp, "A. The answer is (1 + 2). The answer is (3).", Parsed(" ", " ", True)),  # twice: DSS gives up
    (parse_esnli, fx.ESNLI_OK, Parsed("The to go packages are not necessarily from lunch.", "neutral", False)),
    (parse_esnli, fx.ESNLI_NO_ANSWER, Parsed(fx.ESNLI_NO_ANSWER.rstrip(), " ", True)),
    # Parses, but into a label no gold row has ("Premise" was cut to "Pre"): counted as disagreeing.
    (parse_esnli, fx.ESNLI_CUT, Parsed("The woman is posing for the photographer, which is what people do at "
                                       "weddings.", "entailment\n\nPre", False)),
    (parse_anli, fx.ANLI_OK, Parsed("Linguistics involves an analysis of language form, language meaning, and "
                                    "language in context, so context is also a crucial aspect.", "contradiction",
                                    False)),
    # "so the answer is" in lower case: DSS's split fails and both parts are ''.
    (parse_anli, fx.ANLI_LOWERCASE, Parsed("", "", True)),
])
def test_parsers_on_real_completions(parse, output, expected):
    assert parse(output) == expected


def test_parsers_match_the_real_files(dss_root):
    """Hand-picked rows of the real files, by position: the alignment and the parse together."""
    rows = load_split(DSS_DATASETS["svamp"], dss_root, "train").rows
    assert rows[0]["input"].startswith("Luke scored 84 points") and rows[0]["label"] == "( 84.0 / 2.0 )"
    assert (rows[0]["llm_label"], rows[0]["teacher_fallback"]) == ("(84 / 2)", False)
    assert rows[174]["llm_label"] == " " and rows[174]["teacher_fallback"]  # "The answer is ((491 - 21"
    assert sum(r["teacher_fallback"] for r in rows) == 13
    cqa = load_split(DSS_DATASETS["cqa"], dss_root, "train").rows
    assert cqa[0]["llm_label"] == "math problem" == cqa[0]["label"]
    assert [i for i, r in enumerate(cqa) if r["teacher_fallback"]] == [3362, 3913, 4898]
    anli = load_split(DSS_DATASETS["anli1"], dss_root, "valid").rows
    assert anli[203]["llm_label"] == "" and anli[203]["rationale"] == ""
    assert anli[0]["input"].count("</s>") == 1 and anli[0]["label"] == "contradiction"
    esnli = load_split(DSS_DATASETS["esnli"], dss_root, "test").rows
    assert esnli[2758]["llm_label"] == "entailment\n\nPre"


# --- loaders and splits on fixtures ---------------------------------------------------------------

def test_cqa_fixture_aligns_parses_and_splits_like_dss(tmp_path):
    fx.write_cqa(tmp_path, n_train=20)
    rows = load_split(DSS_DATASETS["cqa"], tmp_path, "train").rows
    assert len(rows) == 20
    assert rows[5]["input"] == ("Question number 5?\nAnswer Choices:\n(a) choice 5a\n(b) choice 5b\n(c) choice 5c\n"
                                "(d) choice 5d\n(e) choice 5e")
    assert (rows[5]["label"], rows[5]["llm_label"], rows[5]["rationale"]) == \
        ("choice 5d", "choice 5d", "Reasoning about question 5.")
    assert rows[1]["llm_label"] == "choice 1a" and rows[2]["teacher_fallback"]

    splits = build_splits(load_config(dataset="cqa", data_root=str(tmp_path)))
    assert [len(splits.rows[k]) for k in ("train", "valid", "test")] == [18, 2, 6]
    s = splits.summary.splits
    assert (s["train"].teacher_fallbacks + s["valid"].teacher_fallbacks, s["test"].teacher_agree) == (1, 6)
    assert s["train"].teacher_agree + s["valid"].teacher_agree == 18  # rows 1 and 2 disagree
    # valid is what datasets' train_test_split(test_size=0.1, seed=0) picks from train, as in DSS.
    from datasets import Dataset
    expected = Dataset.from_list([{"i": i} for i in range(20)]).train_test_split(test_size=0.1, seed=0)
    assert splits.rows["valid"]["input"] == [rows[i]["input"] for i in expected["test"]["i"]]
    assert splits.rows["train"]["input"] == [rows[i]["input"] for i in expected["train"]["i"]]


def test_label_type_llm_replaces_only_the_training_labels(tmp_path):
    fx.write_cqa(tmp_path, n_train=40)
    gt = build_splits(load_config(dataset="cqa", data_root=str(tmp_path)))
    llm = build_splits(load_config(dataset="cqa", data_root=str(tmp_path), label_type="llm"))
    assert llm.rows["train"]["label"] == llm.rows["train"]["llm_label"] != gt.rows["train"]["label"]
    assert llm.rows["train"]["input"] == gt.rows["train"]["input"]
    for split in ("valid", "test"):
        assert llm.rows[split]["label"] == gt.rows[split]["label"]
    assert load_config(mode="distill").label_type is None  # resolved to llm by the mode:
    distill = build_splits(load_config(dataset="cqa", data_root=str(tmp_path), mode="distill"))
    assert distill.rows["train"]["label"] == llm.rows["train"]["label"] and distill.summary.label_type == "llm"


def test_subsample_draws_train_with_the_run_seed_before_the_valid_split(tmp_path):
    fx.write_cqa(tmp_path, n_train=80)
    full = load_split(DSS_DATASETS["cqa"], tmp_path, "train").rows
    from datasets import Dataset
    ids = Dataset.from_list([{"i": i} for i in range(80)])
    for seed in (0, 1):
        cfg = load_config(dataset="cqa", data_root=str(tmp_path), subsample=0.25, seed=seed)
        splits = build_splits(cfg)
        kept = ids.train_test_split(test_size=0.75, seed=seed)["train"]
        parts = kept.train_test_split(test_size=0.1, seed=0)
        assert splits.rows["train"]["input"] == [full[i]["input"] for i in parts["train"]["i"]]
        assert splits.rows["valid"]["input"] == [full[i]["input"] for i in parts["test"]["i"]]
        assert len(splits.rows["test"]) == 6  # test is never subsampled
    a = build_splits(load_config(dataset="cqa", data_root=str(tmp_path), subsample=0.25, seed=0))
    b = build_splits(load_config(dataset="cqa", data_root=str(tmp_path), subsample=0.25, seed=1))
    assert set(a.rows["train"]["input"]) != set(b.rows["train"]["input"])
    whole = build_splits(load_config(dataset="cqa", data_root=str(tmp_path), subsample=1.0, seed=5))
    assert len(whole.rows["train"]) + len(whole.rows["valid"]) == 80


def test_nli_input_joins_premise_and_hypothesis_with_eos_and_excluded_rows_are_counted(tmp_path):
    rows = [{"premise": "A man sleeps.", "hypothesis": "A man rests.", "label": 0},
            {"premise": "P2.", "hypothesis": "H2.", "label": -1},  # SNLI's "no gold label"
            {"premise": "P3.", "hypothesis": "H3.", "label": 2}]
    for split in ("train", "valid", "test"):
        fx.write_split(tmp_path, "esnli", split, rows, [fx.ESNLI_OK, fx.ESNLI_OK, fx.ESNLI_NO_ANSWER])
    loaded = load_split(DSS_DATASETS["esnli"], tmp_path, "valid")
    assert [r["input"] for r in loaded.rows] == ["A man sleeps.</s>A man rests.", "P3.</s>H3."]
    assert [r["label"] for r in loaded.rows] == ["entailment", "contradiction"]
    # The teacher output of the excluded row is dropped with it: alignment is by position.
    assert [r["llm_label"] for r in loaded.rows] == ["neutral", " "]
    assert (loaded.excluded, loaded.excluded_why) == (1, "gold label not 0, 1 or 2")
    splits = build_splits(load_config(dataset="esnli", data_root=str(tmp_path)))
    assert splits.summary.splits["test"].excluded == 1
    assert "rows excluded: train 1 (gold label not 0, 1 or 2)" in splits.summary.describe()


def test_real_splits_have_dss_sizes_and_dss_valid_rows(dss_root, tmp_path):
    """Against DSS's own read path (load_dataset('json') then train_test_split), not ours."""
    from datasets import load_dataset

    for name, sizes, fallbacks in (("cqa", (8766, 975, 1221), 3), ("svamp", (720, 80, 200), 15)):
        splits = build_splits(load_config(dataset=name, data_root=str(dss_root)))
        assert tuple(len(splits.rows[k]) for k in ("train", "valid", "test")) == sizes
        assert sum(s.teacher_fallbacks for s in splits.summary.splits.values()) == fallbacks
        dss = load_dataset("json", data_files={"train": str(dss_root / name / f"{name}_train.json")},
                           cache_dir=str(tmp_path / "hf"))["train"].train_test_split(test_size=0.1, seed=0)
        key = "question" if name == "cqa" else "input"
        assert [x.split("\n")[0] for x in splits.rows["valid"]["input"]] == \
            [x.split("\n")[0] for x in dss["test"][key]]
        assert splits.rows["valid"]["label"] == dss["test"]["answer" if name == "cqa" else "label"]
    svamp = build_splits(load_config(dataset="svamp", data_root=str(dss_root))).summary.splits["test"]
    assert 0.6 < svamp.teacher_accuracy < 0.9  # compared as numbers: "(84 / 2)" equals "( 84.0 / 2.0 )"


# --- bad input: one line naming the file, line, field or counts -----------------------------------

def _cfg(root, **kw):
    return load_config(dataset="cqa", data_root=str(root), **kw)


def test_missing_data_root_and_files(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match=r"--data_root .*nowhere: no such directory"):
        load_config(dataset="cqa", data_root=str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match=r"has no cqa/ folder"):
        resolve_data_root(str(tmp_path), "cqa")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cotmi_ds.data.datasets.default_data_roots", lambda: [tmp_path / "datasets"])
    with pytest.raises(UsageError, match=r"--dataset svamp needs the DSS data folder: pass --data_root DIR"):
        resolve_data_root(None, "svamp")
    fx.write_cqa(tmp_path)
    (tmp_path / "cqa" / "cqa_test.json").unlink()
    with pytest.raises(UsageError, match=r"cqa/cqa_test\.json: no such file$"):
        build_splits(_cfg(tmp_path))
    fx.write_cqa(tmp_path)
    (tmp_path / "cqa" / "llm" / "train_CoT_2.json").unlink()
    with pytest.raises(UsageError, match=r"llm/train_CoT_2\.json: no such file, but train_CoT_6\.json exists"):
        build_splits(_cfg(tmp_path))
    for f in (tmp_path / "cqa" / "llm").glob("test_*"):
        f.unlink()
    with pytest.raises(UsageError, match=r"llm/test_CoT_\*\.json: no teacher outputs"):
        load_split(DSS_DATASETS["cqa"], tmp_path, "test")


def test_malformed_json_line_names_file_and_line(tmp_path):
    fx.write_cqa(tmp_path)
    path = tmp_path / "cqa" / "cqa_train.json"
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=rf"^{path}:7: not valid JSON \("):
        build_splits(_cfg(tmp_path))
    (tmp_path / "cqa" / "llm" / "test_CoT_1.json").write_text('["a",\n 3')
    with pytest.raises(UsageError, match=r"test_CoT_1\.json:2: not valid JSON"):
        load_split(DSS_DATASETS["cqa"], tmp_path, "test")
    (tmp_path / "cqa" / "llm" / "test_CoT_1.json").write_text('["a", 3]')
    with pytest.raises(UsageError, match=r"test_CoT_1\.json: item 1 is a int, expected a string"):
        load_split(DSS_DATASETS["cqa"], tmp_path, "test")


def test_data_files_that_are_not_utf8_are_named(tmp_path):
    fx.write_cqa(tmp_path)
    path = tmp_path / "cqa" / "cqa_train.json"
    path.write_bytes(path.read_bytes() + '{"question": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=rf"^{path}: not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8$"):
        build_splits(_cfg(tmp_path))
    teacher = tmp_path / "cqa" / "llm" / "test_CoT_1.json"
    teacher.write_bytes('["caf\u00e9"]'.encode("latin-1"))
    with pytest.raises(UsageError, match=rf"^{teacher}: not UTF-8 text \(byte 0xe9 at offset 5\)"):
        load_split(DSS_DATASETS["cqa"], tmp_path, "test")


@pytest.mark.parametrize("drop, message", [
    ("question", "missing field 'question'"), ("choices", "missing field 'choices'"),
    ("answer", "missing field 'answer'")])
def test_missing_field_is_named(tmp_path, drop, message):
    rows = [fx.cqa_row(i) for i in range(6)]
    del rows[4][drop]
    fx.write_split(tmp_path, "cqa", "test", rows, [fx.cqa_completion(i) for i in range(6)])
    with pytest.raises(UsageError, match=rf"cqa_test\.json:5: {message}"):
        load_split(DSS_DATASETS["cqa"], tmp_path, "test")


def test_wrong_field_types_are_named(tmp_path):
    rows = [fx.cqa_row(0), dict(fx.cqa_row(1), choices=["only", "two"])]
    fx.write_split(tmp_path, "cqa", "test", rows, [fx.cqa_completion(0), fx.cqa_completion(1)])
    with pytest.raises(UsageError, match=r"cqa_test\.json:2: field 'choices' must be a list of 5 strings"):
        load_split(DSS_DATASETS["cqa"], tmp_path, "test")
    fx.write_split(tmp_path, "svamp", "test", [{"input": "x", "label": 3}], ["The answer is (3)."])
    with pytest.raises(UsageError, match=r"svamp_test\.json:1: field 'label' must be a string, got int"):
        load_split(DSS_DATASETS["svamp"], tmp_path, "test")


def test_teacher_count_mismatch_names_both_counts(tmp_path):
    fx.write_split(tmp_path, "cqa", "test", [fx.cqa_row(i) for i in range(7)],
                   [fx.cqa_completion(i) for i in range(6)])
    with pytest.raises(UsageError, match=r"cqa_test\.json: 7 rows but 6 teacher outputs in .*test_CoT_\*\.json "
                                         r"\(2 files\); they must align one-to-one"):
        load_split(DSS_DATASETS["cqa"], tmp_path, "test")


def test_empty_split(tmp_path):
    fx.write_cqa(tmp_path)
    (tmp_path / "cqa" / "cqa_test.json").write_text("\n")
    with pytest.raises(UsageError, match=r"cqa_test\.json: empty split \(0 rows\)"):
        build_splits(_cfg(tmp_path))
    rows = [{"premise": "p", "hypothesis": "h", "label": -1}]
    fx.write_split(tmp_path, "anli1", "test", rows, [fx.ANLI_OK])
    with pytest.raises(UsageError, match=r"anli1_test\.json: empty split \(all 1 rows excluded"):
        load_split(DSS_DATASETS["anli1"], tmp_path, "test")


@pytest.mark.parametrize("flags, message", [
    ({"dataset": "cqa2"}, "--dataset cqa2: no such file or folder, and not a built-in dataset (synthetic, esnli, "
                          "anli1, cqa, svamp); did you mean 'cqa'?"),
    ({"subsample": 0}, "--subsample must be in (0, 1], got 0.0"),
    ({"subsample": 1.5}, "--subsample must be in (0, 1], got 1.5"),
    ({"subsample": -0.1}, "--subsample must be in (0, 1], got -0.1"),
    ({"label_type": "teacher"}, "--label_type 'teacher' is not one of: gt, llm"),
    ({"mode": "standard", "label_type": "llm"}, "--mode standard trains on gt labels; for --label_type llm use --mode distill"),
    ({"mode": "distill", "label_type": "gt"}, "--mode distill trains on llm labels; for --label_type gt use --mode standard"),
])
def test_bad_flags(flags, message):
    with pytest.raises(UsageError) as e:
        load_config(**flags)
    assert str(e.value) == message


def test_subsample_that_keeps_nothing(tmp_path):
    fx.write_cqa(tmp_path, n_train=4)
    with pytest.raises(UsageError, match=r"--subsample 0.01: keeps no training rows of 4"):
        build_splits(_cfg(tmp_path, subsample=0.01))


def test_json_lines_may_end_with_blank_lines(tmp_path):
    fx.write_cqa(tmp_path)
    path = tmp_path / "cqa" / "cqa_test.json"
    path.write_text(path.read_text() + "\n\n")
    assert len(load_split(DSS_DATASETS["cqa"], tmp_path, "test").rows) == 6
    assert json.loads(path.read_text().splitlines()[0])["id"] == "q100"
