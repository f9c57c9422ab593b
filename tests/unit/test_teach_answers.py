"""Reading the teacher's answers: on the benchmarks' real PaLM completions, `cotmi teach`'s path (its
parsers, agreement and publish) gives the teacher accuracy `cotmi data stats` gives; the task kinds'
parsers on the completions the shipped templates ask for."""
from __future__ import annotations

import json

import pytest

from cotmi_ds.config import load_config
from cotmi_ds.data.datasets import DSS_DATASETS, labels_agree, read_json_lines, read_teacher_outputs, teacher_files
from cotmi_ds.data.splits import build_splits
from cotmi_ds.teacher.answers import for_task
from cotmi_ds.teacher.job import plan_requests, prepare, publish
from cotmi_ds.teacher.options import parse_teach_flags


@pytest.mark.parametrize("name", ["cqa", "svamp", "esnli", "anli1"])
def test_palm_completions_give_the_teacher_accuracy_data_stats_gives(name, dss_root, tmp_path):
    opts = parse_teach_flags({"dataset": name, "data_root": str(dss_root), "out": str(tmp_path), "filter": "keep_all"})
    source, template = prepare(opts)
    plan = plan_requests(opts, source, template, model="palm-540b")
    bench = DSS_DATASETS[name]
    answers = {}
    for split, rows in source.splits.items():  # the PaLM completion of each gold row, in file order
        completions = read_teacher_outputs(teacher_files(bench, dss_root, split))
        kept = [c for (lineno, raw), c in zip(read_json_lines(bench.gold_file(dss_root, split)), completions)
                if bench.gold(raw, "", "</s>") is not None]
        assert len(kept) == len(rows)
        for request in plan.requests:
            if request.split == split:
                answers[request.key] = {"key": request.key, "text": kept[request.row], "finish_reason": "stop"}
    publish(plan, answers)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    stats = build_splits(load_config(None, dataset=name, data_root=str(dss_root)), allow_missing=True).summary.splits
    for split, summary in manifest["splits"].items():
        # cqa and svamp have no valid file: the trainer carves valid out of train
        agree = stats[split].teacher_agree + (stats["valid"].teacher_agree if split == "train" and not bench.has_valid else 0)
        assert summary["teacher_correct"] == agree, split
        assert summary["rows"] == len(source.splits[split])
        assert summary["unparsable"] == stats[split].teacher_fallbacks + (
            stats["valid"].teacher_fallbacks if split == "train" and not bench.has_valid else 0)
    assert manifest["splits"]["test"]["teacher_accuracy"] > 0.5  # PaLM is right more often than not


def test_drop_wrong_keeps_exactly_the_rows_whose_answer_agrees(dss_root, tmp_path):
    opts = parse_teach_flags({"dataset": "svamp", "data_root": str(dss_root), "out": str(tmp_path), "splits": "train"})
    source, template = prepare(opts)
    plan = plan_requests(opts, source, template, model="palm-540b")
    completions = read_teacher_outputs(teacher_files(DSS_DATASETS["svamp"], dss_root, "train"))
    publish(plan, {r.key: {"key": r.key, "text": completions[r.row]} for r in plan.requests})
    summary = json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"]
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(train) == summary["kept"] == summary["teacher_correct"] < summary["rows"]
    assert sum(summary["dropped"].values()) == summary["rows"] - summary["kept"]
    assert all(r["rationale"] for r in train)
    assert all(labels_agree(r["llm_label"], r["label"], "numeric") for r in train)


@pytest.mark.parametrize("text, label, rationale", [
    ("Dogs bark. So the answer is (b) dog.", "dog", "Dogs bark."),
    ("Dogs bark. So the answer is (B).", "dog", "Dogs bark."),
    ("It barks, therefore the answer is Dog", "dog", "It barks,"),
    ("Cats meow. The answer is (c) cat.\n\nQ: next question", "cat", "Cats meow."),
])
def test_choice_answers_by_letter_or_text(text, label, rationale):
    parsed = for_task("choice").parse(text, {"choices": ["cow", "dog", "cat"]})
    assert (parsed.label, parsed.rationale, parsed.fallback) == (label, rationale, False)


@pytest.mark.parametrize("text", ["So the answer is (d) horse.", "So the answer is a horse.", "I do not know."])
def test_a_choice_that_is_not_offered_is_unparsed(text):
    assert for_task("choice").parse(text, {"choices": ["cow", "dog", "cat"]}).fallback


@pytest.mark.parametrize("text, label", [
    ("3 + 4 = 7. So the answer is 7.", "7"),
    ("Total cost. The answer is $1,200 dollars.", "1200"),
    ("Negative. The answer is -3.5.", "-3.5"),
    ("So the answer is (21 - 15).", "(21 - 15)"),
])
def test_numeric_answers_and_their_value(text, label):
    parsed = for_task("numeric").parse(text, {})
    assert (parsed.label, parsed.fallback) == (label, False)
    assert for_task("numeric").agrees(parsed.label, {"7": "7.0", "1200": "1200", "-3.5": "( 0 - 3.5 )",
                                                      "(21 - 15)": "6"}[label])


@pytest.mark.parametrize("text", ["So the answer is many.", "No answer here.", "So the answer is __import__('os')"])
def test_numeric_text_that_is_not_arithmetic_is_unparsed(text):
    assert for_task("numeric").parse(text, {}).fallback


def test_exact_answers():
    parsed = for_task("exact").parse("A is B. So the answer is neutral.", {})
    assert (parsed.rationale, parsed.label, parsed.fallback) == ("A is B.", "neutral", False)
    assert for_task("exact").parse("So the answer is", {}).fallback
