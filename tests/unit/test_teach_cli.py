"""`cotmi teach`'s input checks: every bad flag, file or field is one line naming it, exit code 2,
nothing written, and it comes before any heavy import (torch, transformers, openai)."""
from __future__ import annotations

import json
import os

import pytest

from cotmi_ds.errors import UsageError
from cotmi_ds.teacher.job import prepare
from cotmi_ds.teacher.options import parse_teach_flags
from tests.conftest import REPO, run_cotmi

BASE = {"dataset": "data.jsonl", "task": "exact", "out": "out"}


@pytest.mark.parametrize("flags, message", [
    ({**BASE, "datset": "x"}, "unknown flag --datset for `cotmi teach` (did you mean 'dataset'?)"),
    ({"out": "o"}, "--dataset is required"),
    ({"dataset": "d"}, "--out is required"),
    ({**BASE, "samples": 4}, "--samples 4 with --temperature 0 asks the same greedy question 4 times"),
    ({**BASE, "samples": 0}, "--samples must be >= 1, got 0"),
    ({**BASE, "top_p": 1.5}, "--top_p must be in (0, 1], got 1.5"),
    ({**BASE, "concurrency": "many"}, "--concurrency: expected int, got 'many'"),
    ({**BASE, "filter": "best"}, "--filter 'best' is not one of: drop_wrong, gold_label, keep_all"),
    ({**BASE, "task": "regression"}, "--task 'regression' is not one of: choice, exact, numeric"),
    ({**BASE, "splits": "train,dev"}, "--splits train,dev: expected distinct names among train, valid, test"),
    ({**BASE, "base_url": "localhost:8000"}, "--base_url localhost:8000: expected an http:// or https:// URL"),
    ({**BASE, "base_url": ("http://a/v1", "http://a/v1")}, "--base_url http://a/v1,http://a/v1: a URL is listed twice"),
    ({**BASE, "backend": "transformers"}, "--backend transformers needs --model"),
    ({**BASE, "api_key_env": "COTMI_TEST_NO_SUCH_VAR"}, "--api_key_env COTMI_TEST_NO_SUCH_VAR: that environment variable is not set"),
])
def test_bad_flags(flags, message):
    with pytest.raises(UsageError) as e:
        parse_teach_flags(flags, environ={})
    assert str(e.value).startswith(message), str(e.value)


def test_several_endpoints():
    opts = parse_teach_flags({**BASE, "base_url": ("http://a:8000/v1", "http://b:8000/v1")})
    assert opts.base_urls == ["http://a:8000/v1", "http://b:8000/v1"]


def own(tmp_path, rows: list, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, flags, message", [
    # the reader's own checks (data/own.py) reach the user unchanged
    ([{"label": "x"}], {}, r"data.jsonl: no 'input' field"),
    ([{"input": "q", "label": "x"}, "{oops"], {}, r"data.jsonl:2: "),
    ([{"input": "q", "label": "x"}], {"task": "-"}, r"--dataset .*data.jsonl: give --task choice, exact or numeric"),
    # teach's
    ([{"input": "q", "label": "x"}], {"splits": "test"}, r"--splits: .*data.jsonl has no test split \(it has train\)"),
    ([{"input": "q", "label": "x"}], {"template": "choice"}, r"choice: written for task choice, but the answers"),
])
def test_bad_data(tmp_path, rows, flags, message):
    path = own(tmp_path, rows)
    with pytest.raises(UsageError, match=message):
        flags = {**BASE, "dataset": str(path), "out": str(tmp_path / "out"), **flags}
        prepare(parse_teach_flags({k: v for k, v in flags.items() if v != "-"}))
    assert not (tmp_path / "out").exists()


def test_out_must_not_overwrite_the_input(tmp_path):
    own(tmp_path, [{"input": "q", "label": "x"}], "train.jsonl")
    with pytest.raises(UsageError, match=r"--out .*: would overwrite the input file .*train.jsonl"):
        prepare(parse_teach_flags({**BASE, "dataset": str(tmp_path), "out": str(tmp_path)}))


def test_a_template_field_the_data_lacks(tmp_path):
    path = own(tmp_path, [{"input": "q", "label": "x"}])
    mine = tmp_path / "mine.yaml"
    mine.write_text("question: '{input} {context}'\n")
    with pytest.raises(UsageError, match=rf"^{mine}: field {{context}} in `question` is not a field of .*data.jsonl "
                                         r"\(its fields: input, label\)"):
        prepare(parse_teach_flags({**BASE, "dataset": str(path), "template": str(mine)}))


@pytest.fixture(scope="module")
def without_heavy(tmp_path_factory) -> dict[str, str]:
    """A process in which importing torch, transformers or openai fails: input errors come first."""
    blocker = tmp_path_factory.mktemp("no-heavy")
    for name in ("torch", "transformers", "openai"):
        (blocker / name).mkdir()
        (blocker / name / "__init__.py").write_text(f'raise ImportError("{name} imported before the input was checked")\n')
    return {"PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nope.jsonl", "--task", "exact"], "--dataset nope.jsonl: no such file or folder, and not a benchmark"),
    (["--dataset", "data.jsonl", "--task", "exact", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
])
def test_input_errors_exit_2_before_heavy_imports(tmp_path, without_heavy, args, message):
    own(tmp_path, [{"input": "q", "label": "x"}])
    proc = run_cotmi(["teach", *args, "--out", "out"], cwd=tmp_path, timeout=60, **without_heavy)
    assert proc.returncode == 2 and proc.stderr == f"cotmi: error: {message}" + proc.stderr.split(message, 1)[1]
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
