"""Training on your own data: splits drawn as documented, the task kind from --task or the manifest,
what each mode needs from the rows, the summary and `cotmi data stats`, the cache keyed on the files'
bytes, the scorer and the run's name, and the CLI's one-line errors before torch is imported."""
import json
import os

import pytest
from datasets import Dataset

from cotmi_ds.config import load_config
from cotmi_ds.data.datasets import T5_EOS, check_data_files
from cotmi_ds.data.pipeline import rows_key
from cotmi_ds.data.splits import build_splits
from cotmi_ds.data.stats import dataset_stats
from cotmi_ds.data.synthetic import synthetic_splits
from cotmi_ds.errors import UsageError
from cotmi_ds.evaluation.generate import evaluation_settings
from cotmi_ds.evaluation.results import run_metadata
from cotmi_ds.evaluation.scoring import exact_match, numeric_match
from tests.conftest import run_cotmi

ROWS = synthetic_splits(60, 10, seed=0)  # input, label (an equation), rationale


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def folder(tmp_path, manifest=None, **splits):
    """A folder as `cotmi teach` writes it: <split>.jsonl files and manifest.json."""
    root = tmp_path / "arith"
    for name, rows in splits.items():
        write_jsonl(root / f"{name}.jsonl", rows)
    if manifest is not None:
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_one_file_gives_a_test_split_then_a_valid_split_both_drawn_with_seed_0(tmp_path):
    path = write_jsonl(tmp_path / "arith.jsonl", [dict(r, id=i) for i, r in enumerate(ROWS["train"])])
    splits = build_splits(load_config(dataset=str(path), task="numeric"))
    ids = Dataset.from_list([{"i": i} for i in range(60)]).train_test_split(test_size=0.1, seed=0)
    rest = ids["train"].train_test_split(test_size=0.1, seed=0)
    for split, picked in (("test", ids["test"]), ("valid", rest["test"]), ("train", rest["train"])):
        assert splits.rows[split]["input"] == [ROWS["train"][i]["input"] for i in picked["i"]], split
    s = splits.summary
    assert (s.dataset, s.task, list(s.splits)) == ("arith", "numeric", ["train", "valid", "test"])
    assert s.notes == ["test: 10% of the training rows (seed 0)", "valid: 10% of the training rows (seed 0)",
                       "fields ignored: id"]
    assert "no teacher labels (field 'llm_label')" in s.describe()
    # The dataset-size sweep subsamples what is left: the test set is the same for every run.
    half = build_splits(load_config(dataset=str(path), task="numeric", subsample=0.5, seed=1))
    assert list(half.rows["test"]["input"]) == list(splits.rows["test"]["input"]) and len(half.rows["train"]) == 24


def test_a_folder_with_a_manifest_gives_the_task_name_and_scorer(tmp_path):
    train = [dict(r, llm_label=r["label"]) for r in ROWS["train"][:20]]
    train[0]["llm_label"] = "( 1 + 1 )"                  # the teacher was wrong once
    test = [dict(r) for r in ROWS["test"]]
    test[0]["llm_label"] = "(" + test[0]["label"] + ")"  # another form of the same value: agrees
    root = folder(tmp_path, {"task": "numeric", "name": "word problems"}, train=train, test=test)
    cfg = check_data_files(load_config(dataset=str(root / ".." / "arith")))
    assert (cfg.dataset, cfg.task) == (str(root), "numeric")  # as the run records it
    splits = build_splits(cfg)
    assert [len(d) for d in splits.rows.values()] == [18, 2, 10]
    s = splits.summary.splits
    assert s["train"].teacher_agree + s["valid"].teacher_agree == 19
    assert (s["test"].teacher_agree, s["test"].teacher_labels, s["test"].teacher_accuracy) == (1, 1, 1.0)
    assert evaluation_settings(cfg)["scorer"] is numeric_match
    meta = run_metadata(cfg)
    assert (meta["dataset"], meta["dataset_name"], meta["task"]) == (str(root), "word problems", "numeric")
    assert "test 100.00% of 1" in splits.summary.describe()
    # --task overrides the manifest
    assert evaluation_settings(check_data_files(load_config(dataset=str(root), task="exact")))["scorer"] is exact_match


def test_choices_are_shown_to_the_student_after_the_input(tmp_path):
    rows = [{"input": f"Is {i} even?", "label": "yes" if i % 2 == 0 else "no", "choices": ["yes", "no"]}
            for i in range(12)]
    splits = build_splits(load_config(dataset=str(write_jsonl(tmp_path / "even.jsonl", rows)), task="choice",
                                      mode="standard"))
    assert set(splits.rows["train"]["input"]) | set(splits.rows["test"]["input"]) == {
        f"Is {i} even?\nAnswer Choices:\n(a) yes\n(b) no" for i in range(12)} - set(splits.rows["valid"]["input"])


NO_RATIONALES = [{"input": r["input"], "label": r["label"]} for r in ROWS["train"][:20]]
SOME_RATIONALES = [r if i != 3 else {"input": r["input"], "label": r["label"]} for i, r in enumerate(ROWS["train"])]
WHY_RATIONALES = ("learns from the teacher's rationales: generate them with `cotmi teach` (docs/teacher.md), or train "
                  "--mode standard")


@pytest.mark.parametrize("rows, flags, message", [
    (NO_RATIONALES, {"mode": "dss"}, f": no row has a 'rationale' field; --mode dss {WHY_RATIONALES}"),
    (NO_RATIONALES, {"mode": "single"}, f": no row has a 'rationale' field; --mode single {WHY_RATIONALES}"),
    (SOME_RATIONALES, {"mode": "mi"},
     f":4: missing field 'rationale' (1 of 60 rows lack it); --mode mi {WHY_RATIONALES}"),
    (NO_RATIONALES, {"mode": "distill"}, ": no row has a 'llm_label' field; --mode distill trains on the teacher's "
                                         "labels: generate them with `cotmi teach` (docs/teacher.md), or train on the "
                                         "gold labels"),
    (ROWS["train"], {"mode": "dss", "label_type": "llm"}, ": no row has a 'llm_label' field; --label_type llm trains"),
])
def test_a_mode_refuses_data_without_what_it_trains_on(tmp_path, rows, flags, message):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(UsageError) as e:
        build_splits(load_config(dataset=str(path), task="numeric", **flags))
    assert str(e.value).startswith(str(path) + message), str(e.value)


def test_standard_needs_no_rationales_and_distill_trains_on_the_teachers_labels(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", NO_RATIONALES)
    splits = build_splits(load_config(dataset=str(plain), task="numeric", mode="standard"))
    assert set(splits.rows["train"]["rationale"]) == {None} and len(splits.rows["train"]) == 16
    taught = [dict(r, llm_label=f"( {i} + 0 )") for i, r in enumerate(NO_RATIONALES)]
    root = folder(tmp_path, {"task": "numeric"}, train=taught, test=NO_RATIONALES[:4])
    splits = build_splits(load_config(dataset=str(root), mode="distill"))
    assert splits.rows["train"]["label"] == splits.rows["train"]["llm_label"]
    assert splits.rows["test"]["label"] == [r["label"] for r in NO_RATIONALES[:4]]  # evaluation: gold


def test_valid_and_test_rows_without_rationales_encode_with_an_empty_one(tmp_path, tiny_tokenizer):
    from cotmi_ds.data.encode import encode_split
    from cotmi_ds.modes import MODES

    test = [dict(r) for r in ROWS["test"][:3]]
    del test[1]["rationale"]
    root = folder(tmp_path, {"task": "numeric"}, train=ROWS["train"][:20], test=test)
    rows = build_splits(load_config(dataset=str(root), mode="mi")).rows["test"]
    assert rows["rationale"][1] is None
    for mode in ("mi", "single"):
        encoded = encode_split(rows, tiny_tokenizer, 64, 32, mode=MODES[mode])
        if mode == "mi":
            assert encoded["rationale_ids"][1] == [tiny_tokenizer.eos_token_id]
        else:
            assert tiny_tokenizer.decode(encoded["target_ids"][1], skip_special_tokens=True) == \
                "So the answer is " + test[1]["label"]


def test_the_cache_keys_on_the_files_bytes_not_their_size_or_time(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS["train"])
    cfg = check_data_files(load_config(dataset=str(path), task="numeric"))
    before, stat = rows_key(cfg, T5_EOS), path.stat()
    path.write_text(path.read_text().replace("apples", "melons", 1))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert rows_key(cfg, T5_EOS) != before
    assert rows_key(check_data_files(load_config(dataset=str(path), task="exact")), T5_EOS) != rows_key(cfg, T5_EOS)


def test_stats_on_own_data(tmp_path):
    train = [dict(r) for r in ROWS["train"][:30]]
    for r in train[:5]:
        del r["rationale"]
    root = folder(tmp_path, {"task": "numeric"}, train=train, test=ROWS["test"])
    report = dataset_stats(load_config(dataset=str(root), scratch_vocab_size=96))
    lines = report.splitlines()
    assert lines[0] == f"arith from {root} (task numeric, --mode mi, training labels: gt)"
    assert lines[2] == "valid: 10% of the training rows (seed 0)"
    train_line = next(line for line in lines if line.startswith("train: "))
    assert train_line.startswith("train: 27 rows; no teacher labels; ")
    rationale_rows = [line for line in lines if line.startswith("    rationale")]
    lacking = [int(line.split("(")[-1].split(" rows without one")[0]) for line in rationale_rows if "without" in line]
    assert len(rationale_rows) == 3 and sum(lacking) == 5  # in train and valid; test has them all


@pytest.mark.parametrize("flags, message", [
    ({"dataset": "svamp", "task": "exact"}, "--task exact: svamp is a numeric task; leave --task out for a built-in "
                                            "dataset"),
    ({"dataset": "./nowhere.jsonl"}, "--dataset ./nowhere.jsonl: no such file or folder, and not a built-in dataset"),
    ({"dataset": "{tmp}/t.jsonl", "task": "sums"}, "--task 'sums' is not one of: choice, exact, numeric"),
])
def test_bad_flags(tmp_path, flags, message):
    write_jsonl(tmp_path / "t.jsonl", ROWS["train"])
    with pytest.raises(UsageError) as e:
        load_config(**{k: v.format(tmp=tmp_path) for k, v in flags.items()})
    assert str(e.value).startswith(message), str(e.value)


def test_the_task_is_needed(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS["train"])
    with pytest.raises(UsageError, match=r"^--dataset .*t\.jsonl: give --task choice, exact or numeric"):
        check_data_files(load_config(dataset=str(path)))


@pytest.mark.parametrize("rows, flags, message", [
    ([{"input": "q", "label": 7}], ["--task", "numeric"],
     ':1: field \'label\' must be a string, got int 7 (write it as "7")'),
    (NO_RATIONALES, ["--task", "numeric", "--mode", "dss"],
     f": no row has a 'rationale' field; --mode dss {WHY_RATIONALES}"),
    # a file pyarrow cannot parse: our line only, not datasets' logged error before it
    ([{"input": "q\ud800", "label": "a"}], ["--task", "exact"],
     ":1: field 'input' holds text that is not valid Unicode ('\\ud800': a lone surrogate)"),
])
def test_the_cli_says_one_line_before_importing_torch_and_writes_nothing(tmp_path, without_torch, rows, flags,
                                                                         message):
    path = write_jsonl(tmp_path / "data" / "t.jsonl", rows)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cotmi(["train", "--dataset", str(path), *flags], cwd=work, timeout=120, **without_torch)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [f"cotmi: error: {path}{message}"]
    assert list(work.iterdir()) == [] and [p.name for p in path.parent.iterdir()] == ["t.jsonl"]


def test_cotmi_eval_of_a_run_on_own_data_scores_by_its_task(tmp_path):
    from cotmi_ds.evaluation.command import eval_config, resolve_checkpoint

    root = folder(tmp_path, {"task": "numeric"}, train=ROWS["train"])
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text('{"model_type": "t5"}')
    (run / "model" / "model.safetensors").write_bytes(b'\x02\x00\x00\x00\x00\x00\x00\x00{}')  # no tensors
    (run / "config.yaml").write_text(check_data_files(load_config(dataset=str(root))).to_yaml())
    run_cfg, cfg = eval_config(resolve_checkpoint(str(run)), None, {})
    assert (cfg.dataset, cfg.task) == (str(root), "numeric") and evaluation_settings(cfg)["scorer"] is numeric_match
    # a model folder evaluated on own data: the task from the folder's manifest
    _, cfg = eval_config(resolve_checkpoint(str(run / "model")), None, {"dataset": str(root), "tokenizer": "t5-small"})
    assert cfg.task == "numeric"
