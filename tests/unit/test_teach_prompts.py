"""Templates: the shipped ones render and their exemplars answer in the form their parser reads;
a user's template file is checked, one line naming the file and the field or key."""
from __future__ import annotations

import pytest

from cotmi_ds.data.datasets import DSS_DATASETS
from cotmi_ds.errors import UsageError
from cotmi_ds.teacher.answers import for_benchmark, for_task
from cotmi_ds.teacher.prompts import load_template, shipped_names


def test_shipped_templates():
    assert shipped_names() == ["anli1", "choice", "cqa", "esnli", "exact", "numeric", "svamp"]


@pytest.mark.parametrize("name", list(DSS_DATASETS))
def test_benchmark_exemplars_answer_as_dss_parses_them(name):
    template = load_template(name)
    answering = for_benchmark(name)
    assert len(template.shots) >= 6
    for shot in template.shots:
        parsed = answering.parse(shot["answer"], shot)
        assert not parsed.fallback and parsed.rationale and parsed.label, shot
        assert parsed.label in ("entailment", "neutral", "contradiction") or name in ("cqa", "svamp")


def test_cqa_exemplars_name_a_choice_of_their_own_question():
    for shot in load_template("cqa").shots:
        label = for_benchmark("cqa").parse(shot["answer"], shot).label
        assert f") {label}\n" in shot["input"] + "\n"


def test_svamp_exemplars_equations_compute_the_numbers_their_rationales_give():
    from cotmi_ds.data.arith import evaluate_arithmetic

    for shot in load_template("svamp").shots:
        label = for_benchmark("svamp").parse(shot["answer"], shot).label
        assert f"= {evaluate_arithmetic(label):g}" in shot["answer"]


def test_chat_and_completion_rendering():
    template = load_template("cqa")
    row = {"input": "Where is the cat?\nAnswer Choices:\n(a) here\n(b) there"}
    messages = template.render(row, "chat", "row 1")
    assert [m["role"] for m in messages] == ["user", "assistant"] * 7 + ["user"]
    assert messages[-1]["content"] == "Q: Where is the cat?\nAnswer Choices:\n(a) here\n(b) there\nA:"
    prompt = template.render(row, "completion", "row 1")
    assert prompt.startswith("Q: What do people use") and prompt.endswith("(b) there\nA:")
    assert prompt.count("\n\nQ: ") == 7


def test_the_teacher_reads_a_rows_choices_as_the_student_does(tmp_path):
    from cotmi_ds.data.own import format_choices
    from cotmi_ds.teacher.job import prepare
    from cotmi_ds.teacher.options import parse_teach_flags

    (tmp_path / "d.jsonl").write_text('{"input": "Pick one", "label": "y", "choices": ["x", "y"]}\n')
    source, template = prepare(parse_teach_flags({"dataset": str(tmp_path / "d.jsonl"), "task": "choice", "out": "o"}))
    row = source.splits["train"][0]
    messages = template.render(row.fields, "chat", row.where)
    assert messages[0]["role"] == "system" and "So the answer is (x)" in messages[0]["content"]
    assert messages[1]["content"] == f"Q: {format_choices('Pick one', ['x', 'y'])}\nA:"
    assert row.input == "Pick one"  # the output keeps the input as written


@pytest.mark.parametrize("text, message", [
    ("question: 'Q: {question}'\n", r"field \{question\} in `question` is not a field of data.jsonl \(its fields: choices, input\)"),
    ("question: 'Q: {label}'\n", r"field \{label\} in `question` would show the teacher what it must answer"),
    ("question: 'Q: {input.x}'\n", r"must be a plain field name"),
    ("question: 'Q: {input'\n", r"not a valid template"),
    ("question: 'Q: no slot'\n", r"has no \{field\} slot"),
    ("question: 'Q: {input}'\nshots: [{answer: 'x'}]\n", r"shot 1 has no value for field 'input'"),
    ("question: 'Q: {input}'\nprompt: x\n", r"unknown key 'prompt'"),
    ("question: 'Q: {input}'\ntask: regression\n", r"`task` 'regression'"),
    ("question: [\n", r"not valid YAML/JSON"),
])
def test_a_bad_template_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=rf"^{path}(:2)?: .*{message}") as e:
        load_template(str(path)).check_fields({"input", "choices"}, "data.jsonl")
    assert "\n" not in str(e.value)


def test_an_unknown_template_name():
    with pytest.raises(UsageError, match=r"--template nope: no such file, and not a shipped template \(anli1, "):
        load_template("nope")


def test_generic_templates_read_what_they_ask_for():
    assert for_task("choice").parse("So the answer is (a) x.", {"choices": ["x"]}).label == "x"
    for name in ("choice", "exact", "numeric"):
        assert "So the answer is" in load_template(name).instructions
