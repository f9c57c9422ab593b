"""`cotmi teach` against a real OpenAI-compatible server: `transformers serve` with a tiny causal LM
(one server for the module), reached directly or through a loopback proxy that counts, holds or
fails requests. The tiny model answers gibberish: these tests check the plumbing (nothing asked
twice once answered, nothing lost, errors sorted and reported); reading real completions is tested
on PaLM's outputs in test_answers.py."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cotmi_ds.distributed import reserved_port
from tests.conftest import child_env, kill_group, run_cotmi
from tests.teach_servers import FaultProxy, TeacherServer, build_tiny_causal_lm, teacher_server

ROWS = 12
FAST = ["--max_tokens", "8", "--concurrency", "4", "--max_retries", "1", "--timeout_s", "60"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def server(model):
    with reserved_port() as port:
        s = teacher_server(model, port)
    yield s
    s.kill()


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.url)
    yield p
    p.close()


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"input": f"What is {i} plus {i}?", "label": str(2 * i)}) + "\n"
                            for i in range(ROWS)))
    return path


def teach(data: Path, out: Path, url: str, *flags, timeout: int = 180, **env):
    return run_cotmi(["teach", "--dataset", data, "--task", "numeric", "--out", out, "--base_url", url,
                      "--filter", "keep_all", *FAST, *flags], cwd=out.parent, timeout=timeout, **env)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_job_publishes_its_splits_and_manifest_and_a_rerun_asks_nothing(data, tmp_path, proxy):
    out = tmp_path / "out"
    secret = "sk-test-7f3a9c-never-written"
    done = teach(data, out, proxy.url, "--api_key_env", "TEACHER_KEY", TEACHER_KEY=secret)
    assert done.returncode == 0, done.stderr
    assert proxy.relayed == ROWS and max(proxy.bodies.values()) == 1  # each question once
    assert proxy.auth == {f"Bearer {secret}"}  # the key was sent...
    for path in out.iterdir():  # ...and written nowhere, nor printed
        assert secret not in path.read_text(), path
    assert secret not in done.stdout + done.stderr
    train = rows(out / "train.jsonl")
    assert [r["input"] for r in train] == [f"What is {i} plus {i}?" for i in range(ROWS)]
    assert all(set(r) == {"input", "label", "rationale", "llm_label"} for r in train)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "numeric" and manifest["filter"] == "keep_all"
    assert manifest["splits"]["train"]["rows"] == ROWS and manifest["splits"]["train"]["kept"] == ROWS
    assert manifest["teacher"]["endpoints"] == [proxy.url] and len(manifest["settings_sha256"]) == 64
    assert "train: 12 rows, teacher accuracy" in done.stdout
    again = teach(data, out, proxy.url, "--api_key_env", "TEACHER_KEY", TEACHER_KEY=secret)
    assert again.returncode == 0, again.stderr
    assert proxy.relayed == ROWS and f"{ROWS} already answered" in again.stdout
    assert rows(out / "train.jsonl") == train
    # Other decoding settings are other questions, asked anew beside the cached answers: here two
    # samples per row, each with its own seed.
    other = teach(data, out, proxy.url, "--samples", "2", "--temperature", "0.7")
    assert other.returncode == 0 and "0 already answered" in other.stdout, other.stderr
    assert proxy.relayed == 3 * ROWS and max(proxy.bodies.values()) == 1
    seeds = sorted(json.loads(body).get("seed", -1) for body in proxy.bodies)
    assert seeds == [-1] * ROWS + [0] * ROWS + [1] * ROWS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 2 and "sample_accuracy" in manifest["splits"]["train"]


def test_the_server_killed_mid_run_then_restarted_loses_nothing_and_repeats_nothing(data, tmp_path, model):
    out = tmp_path / "out"
    with reserved_port() as port:  # a server of its own: this test kills it
        server = teacher_server(model, port)
        try:
            _kill_mid_run_and_restart(data, out, server, model, port)
        finally:
            server.kill()


def _kill_mid_run_and_restart(data: Path, out: Path, server: TeacherServer, model: Path, port: int) -> None:
    before = server.answered()
    proc = subprocess.Popen([sys.executable, "-m", "cotmi_ds", "teach", "--dataset", str(data), "--task", "numeric",
                             "--out", str(out), "--base_url", server.url, "--filter", "keep_all", *FAST,
                             "--concurrency", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), start_new_session=True)
    try:
        server.wait_for(lambda: server.answered() >= before + 5, 120, "fifth answer")
        server.kill()  # SIGKILL, mid-run
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 75, stderr
    assert "no teacher could answer" in stderr and "run the same command again" in stderr
    cached = len((out / "cache.jsonl").read_text().splitlines())
    # One request at a time: the first four answers were cached before the fifth was asked (whose
    # answer may have died with the server, unread).
    assert 4 <= cached < ROWS and not (out / "manifest.json").exists()
    restarted = teacher_server(model, port)
    try:
        done = teach(data, out, restarted.url)
        assert done.returncode == 0, done.stderr
        assert restarted.answered() == ROWS - cached  # only the unanswered ones were asked
    finally:
        restarted.kill()
    assert len(rows(out / "train.jsonl")) == ROWS


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_teach_stopped_mid_run_and_started_again_asks_only_what_is_missing(data, tmp_path, proxy, how):
    out = tmp_path / "out"
    proxy.hold_after = 5
    proc = subprocess.Popen([sys.executable, "-m", "cotmi_ds", "teach", "--dataset", str(data), "--task", "numeric",
                             "--out", str(out), "--base_url", proxy.url, "--filter", "keep_all", *FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            start_new_session=True)
    try:
        assert proxy.held.wait(120), "no request was held"
        os.kill(proc.pid, how)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    if how == signal.SIGTERM:
        assert proc.returncode == 75 and "stopped by SIGTERM" in stderr, stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    cached = {json.loads(line)["row"] for line in (out / "cache.jsonl").read_text().splitlines()}
    assert len(cached) <= 5  # answers relayed but unread when it stopped are not answered: asked again
    proxy.hold_after = None
    proxy.release()
    before = proxy.bodies.copy()
    done = teach(data, out, proxy.url)
    assert done.returncode == 0, done.stderr
    asked = proxy.bodies - before
    assert max(asked.values()) == 1
    assert sorted(asked_rows(asked)) == sorted(set(range(ROWS)) - cached)  # exactly what was not cached
    assert len(rows(out / "train.jsonl")) == ROWS


def asked_rows(bodies) -> list[int]:
    return [int(re.search(rb"What is (\d+) plus", body).group(1)) for body in bodies]


def test_errors_are_retried_after_retry_after_or_recorded_and_reported(data, tmp_path, proxy):
    out = tmp_path / "out"
    proxy.script = [(429, {"Retry-After": "1"}), (500, {}), (400, {})]
    done = teach(data, out, proxy.url, "--concurrency", "1", "--max_retries", "2")
    assert done.returncode == 0, done.stderr
    (t429, s429), (t500, s500), (t400, s400) = proxy.log[:3]
    assert (s429, s500, s400) == (429, 500, 400)
    assert t500 - t429 >= 0.95  # the client waited as Retry-After said
    manifest = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert manifest["rejected"] == 1 and manifest["rows"] == ROWS
    assert manifest["kept"] == ROWS - 1 and manifest["dropped"] == {"no completion (every request for it was rejected)": 1}
    assert "rejected 1" in done.stdout
    assert proxy.relayed == ROWS - 1
    again = teach(data, out, proxy.url)  # a rejected request is recorded: not asked again
    assert again.returncode == 0 and proxy.relayed == ROWS - 1


def test_a_server_that_keeps_failing_ends_the_job_with_75_and_what_it_said(data, tmp_path, proxy):
    out = tmp_path / "out"
    proxy.script = [(503, {})] * 50
    done = teach(data, out, proxy.url, "--max_retries", "0")
    assert done.returncode == 75, done.stderr
    assert "no teacher could answer" in done.stderr and "503" in done.stderr
    assert not (out / "manifest.json").exists() and not (out / "train.jsonl").exists()


def test_a_wrong_url_or_model_is_one_line_and_writes_nothing(data, tmp_path, server):
    with reserved_port() as unused:
        out = tmp_path / "a"
        wrong = teach(data, out, f"http://127.0.0.1:{unused}/v1")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert wrong.stderr.startswith(f"cotmi: error: --base_url http://127.0.0.1:{unused}/v1: no answer")
    assert not out.exists()
    out = tmp_path / "b"
    wrong = teach(data, out, server.url, "--model", "no-such-model")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert f"--model no-such-model: not served at {server.url} (it serves: {server.model})" in wrong.stderr
    assert not out.exists()
