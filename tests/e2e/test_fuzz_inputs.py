"""Property-based fuzzing of what users hand the trainer as files: config files (any YAML or JSON,
aliases, deep nesting, unencodable text) and checkpoint metadata (a real one with any field changed,
removed or nested). Whatever the input, reading it gives a config / a resumable checkpoint, or one
UsageError line; never another exception. In-process, no training (hypothesis, a few hundred cases)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotmi_ds.errors import UsageError

FLAGS = ["seed", "lr", "max_steps", "mode", "dataset", "model", "extends", "require", "overwrite", "batch_size",
         "eval_every", "max_new_tokens", "dropout", "resume", "output_dir", "tokenizer"]
TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT | st.sampled_from(FLAGS + ["auto", "", "1e100"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(TEXT | st.sampled_from(FLAGS), inner, max_size=4), max_leaves=20)
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


def one_line(e: UsageError) -> None:
    text = str(e)
    assert "\n" not in text and 0 < len(text) < 2000, text[:3000]


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


CONFIG_TEXTS = (
    st.dictionaries(st.sampled_from(FLAGS) | TEXT, VALUES, max_size=6).map(
        lambda d: json.dumps(d, allow_nan=True))
    | st.dictionaries(st.sampled_from(FLAGS), VALUES, max_size=6).map(lambda d: _yaml_dump(d))
    | st.integers(1, 3000).map(lambda n: f"lr: {_nested(n)}\n")
    | st.integers(2, 12).map(lambda n: "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"b{i}: &b{i} [{', '.join(['*' + ('a' if i == 0 else f'b{i - 1}')] * 9)}]\n" for i in range(n)))
    | st.sampled_from(['model: "\\ud800"\n', 'model: "\\U0000DFFF"\n', '{"model": "\\udc00x"}',
                       "extends: [1]\n", "require: [{a: 1}]\n", "require: nope\n", "? [a]\n: 1\n", "1: 2\n"])
    | TEXT.map(lambda t: f"model: {t}\n") | st.text(max_size=40)
)


def _yaml_dump(data) -> str:
    import yaml

    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return "{}"


@SLOW
@given(text=CONFIG_TEXTS, suffix=st.sampled_from([".yaml", ".json"]))
def test_any_config_file_is_a_config_or_one_line(tmp_path, text, suffix):
    from cotmi_ds.config import load_config

    path = tmp_path / f"c{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(str(path))
    except UsageError as e:
        one_line(e)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint folder with complete, valid metadata (two small files, their sizes and sums)."""
    import hashlib

    from cotmi_ds.checkpoint.layout import FORMAT, META, SHA256
    from cotmi_ds.data.sampler import BatchOrder
    from cotmi_ds.training.state import TrainState

    folder = tmp_path_factory.mktemp("ckpt") / "step-2"
    folder.mkdir()
    files = {"mp_rank_00_model_states.pt": b"weights", "rank-0.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    state = TrainState(BatchOrder(10, 2, 0, 1, 0))
    state.evaluations.append({"step": 1, "valid": {"accuracy": 0.5}, "test": {"accuracy": 0.25}})
    meta = {"format": FORMAT, "step": 2, "world_size": 1, "zero_stage": 0, "precision": "fp32",
            "model": {"name": "scratch", "parameters": 10, "summary": "tiny", "shapes_sha256": "a" * 64,
                      "vocab_sha256": "b" * 64},
            "config": {"seed": 0}, "trainer": state.state_dict(),
            "engine": {"global_steps": 2, "global_samples": 4, "skipped_steps": 0},
            "files": {n: len(d) for n, d in files.items()},
            SHA256: {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
            "saved_at": "2026-01-01T00:00:00", "versions": {"cotmi_ds": "0.1.0"}}
    (folder / META).write_text(json.dumps(meta))
    return folder


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


@st.composite
def edited_metadata(draw, meta: dict):
    """The metadata with one to three places replaced by any JSON value, removed, or nested deep."""
    meta = json.loads(json.dumps(meta))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(meta) if p]
        if not paths:
            break
        *parent_path, key = draw(st.sampled_from(paths))
        parent = meta
        for part in parent_path:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "remove", "nest"]))
        if action == "remove" and isinstance(parent, dict):
            del parent[key]
        elif action == "nest":
            parent[key] = json.loads(_nested(draw(st.integers(50, 500))))
        else:
            parent[key] = draw(VALUES)
    return meta


@SLOW
@given(data=st.data())
def test_any_checkpoint_metadata_resumes_or_is_one_line(checkpoint, data):
    """What a resume reads from the metadata, as the trainer reads it: the checked metadata, the
    model's identity against this run's, the trainer's state into a data order."""
    from cotmi_ds.checkpoint.layout import META, RESUME_FIELDS, check_same_model, read_checkpoint
    from cotmi_ds.data.sampler import BatchOrder
    from cotmi_ds.evaluation.results import select_metrics
    from cotmi_ds.training.state import TrainState

    original = json.loads((checkpoint / META).read_text())
    meta = data.draw(edited_metadata(original))
    (checkpoint / META).write_text(json.dumps(meta, allow_nan=True))
    try:
        info = read_checkpoint(checkpoint, "--resume", requires=RESUME_FIELDS)
        check_same_model(info, original["model"], "--resume")
        TrainState(BatchOrder(12, 2, 0, 1, 0)).load_state_dict(info.meta["trainer"], info.step, "--resume")
        if info.meta["trainer"]["evaluations"]:
            select_metrics(info.meta["trainer"]["evaluations"])
    except UsageError as e:
        one_line(e)
    finally:
        (checkpoint / META).write_text(json.dumps(original))
