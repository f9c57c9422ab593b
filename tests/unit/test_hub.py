"""Hub names: asked once with one request and used from the local cache when the hub cannot be reached,
refused in one line naming the flag and what works offline; one download per node (local rank 0), the
other ranks wait; nothing fetched offline, for scratch or local models, or on a single rank."""
import socket
import threading

import pytest
import torch

from cotmi_ds.config import load_config
from cotmi_ds.distributed import DistEnv
from cotmi_ds.errors import UsageError
from cotmi_ds.model import hub
from tests.conftest import run_cotmi


class CountingHub:
    """A stand-in for the hub on a loopback port that counts the connections made to it and answers
    each with ``reply`` (None: closes the connection unanswered, as a hub that cannot answer)."""

    def __init__(self, reply: bytes | None = None):
        self.reply, self.connections = reply, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            with conn:
                self.connections += 1
                if self.reply is not None:
                    conn.recv(65536)
                    conn.sendall(self.reply)

    def close(self):
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self.server.close()
        self.thread.join()


NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nX-Error-Code: RepoNotFound\r\nContent-Type: application/json\r\n"
             b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, the hub allowed (tests run with HF_HUB_OFFLINE=1), nothing remembered."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    hub.forget()
    yield tmp_path / "hub"
    hub.forget()


@pytest.fixture
def dead_hub(monkeypatch):
    server = CountingHub()
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)
    yield server
    server.close()


def cache_model(cache, name: str, t5, tokenizer) -> None:
    """``name`` in the cache's layout (refs/main -> snapshots/<commit>/), as `hf download` leaves it."""
    repo = cache / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    t5.save_pretrained(repo / "snapshots" / "0123abc")
    tokenizer.save_pretrained(repo / "snapshots" / "0123abc")


def test_an_unreachable_hub_is_asked_once_and_a_cached_model_loads_from_the_cache(
        hub_cache, dead_hub, tiny_t5, tiny_tokenizer):
    """from_pretrained would retry each file for half a minute: it gets the cache's folder instead,
    and no later name waits on the hub again."""
    from cotmi_ds.data.tokenizer import load_tokenizer
    from cotmi_ds.model.student import student_config

    cache_model(hub_cache, "acme/tiny-t5", tiny_t5, tiny_tokenizer)
    cfg = load_config(model="acme/tiny-t5")
    hub.resolve_names(cfg)
    tokenizer = load_tokenizer("acme/tiny-t5", "--model")
    assert student_config(cfg, tokenizer).d_model == tiny_t5.config.d_model
    assert hub.resolve("acme/tiny-t5", "--model") == str(hub_cache / "models--acme--tiny-t5" / "snapshots" / "0123abc")
    with pytest.raises(UsageError):
        hub.resolve("acme/other", "--model")
    assert dead_hub.connections == 1


def test_a_name_the_hub_cannot_give_is_one_line_naming_the_flag_and_what_works_offline(
        hub_cache, dead_hub, tiny_t5, tiny_tokenizer, tmp_path):
    cache_model(hub_cache, "acme/tiny-t5", tiny_t5, tiny_tokenizer)
    (hub_cache / "models--acme--half" / "refs").mkdir(parents=True)  # a config only: not a whole model
    (hub_cache / "models--acme--half" / "refs" / "main").write_text("c0")
    (hub_cache / "models--acme--half" / "snapshots" / "c0").mkdir(parents=True)
    tiny_t5.config.save_pretrained(hub_cache / "models--acme--half" / "snapshots" / "c0")
    with pytest.raises(UsageError) as e:
        hub.resolve("acme/tiny-t6", "--model", offline_names=["google/t5-v1_1-small"])
    assert str(e.value).startswith("--model acme/tiny-t6 (did you mean 'acme/tiny-t5'?): not in the local "
                                   "Hugging Face cache, and the Hugging Face hub cannot be reached from ")
    assert "names that work without the hub: google/t5-v1_1-small, acme/tiny-t5; " in str(e.value)
    with pytest.raises(UsageError, match=r"^--model acme/half: not in the local Hugging Face cache \(only part of "
                                         r"it: no weights\)"):
        hub.resolve("acme/half", "--model")
    assert hub.resolve("acme/half", "--model", "config").endswith("c0")  # enough for a plan
    # The tokenizer named by --model is refused as --model's.
    from cotmi_ds.data.tokenizer import given_tokenizer, load_tokenizer

    with pytest.raises(UsageError, match=r"^--model zzz/none: "):
        load_tokenizer(*given_tokenizer(load_config(model="zzz/none")))
    with pytest.raises(UsageError, match=r"^--tokenizer zzz/none: "):
        hub.resolve_names(load_config(tokenizer="zzz/none"))
    assert dead_hub.connections == 1


def test_offline_the_hub_is_never_asked(hub_cache, dead_hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match=r"^--model acme/x: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
                                         r"is set; the local Hugging Face cache holds no model; or pass"):
        hub.resolve("acme/x", "--model")
    assert dead_hub.connections == 0


def test_a_name_the_hub_does_not_know_is_refused_as_such(hub_cache, monkeypatch):
    server = CountingHub(NOT_FOUND)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)
    try:
        with pytest.raises(UsageError, match=r"^--model acme/typo: no such model on the Hugging Face hub"):
            hub.resolve("acme/typo", "--model")
        assert hub.ask_hub("acme/typo") and server.connections == 1  # remembered
    finally:
        server.close()


def test_local_paths_and_scratch_are_never_looked_up(hub_cache, dead_hub, tmp_path):
    assert hub.resolve(str(tmp_path), "--model") == str(tmp_path)
    assert hub.resolve("scratch", "--model") == "scratch"
    hub.resolve_names(load_config())
    assert dead_hub.connections == 0


def test_the_in_process_teacher_resolves_its_model_as_the_student_does(hub_cache, dead_hub):
    """`cotmi teach --backend transformers --model NAME`: one request, then one line naming --model."""
    import asyncio

    from cotmi_ds.teacher.clients import LocalModel
    from cotmi_ds.teacher.options import parse_teach_flags

    opts = parse_teach_flags({"dataset": "d.jsonl", "task": "exact", "out": "out", "backend": "transformers",
                              "model": "acme/teacher"})
    with pytest.raises(UsageError, match=r"^--model acme/teacher: not in the local Hugging Face cache, and the "
                                         r"Hugging Face hub cannot be reached from "):
        asyncio.run(LocalModel(opts, stop=()).check())
    assert dead_hub.connections == 1


@pytest.mark.parametrize("command", [["train"], ["plan"]])
def test_the_commands_refuse_an_unreachable_name_after_one_request(command, tmp_path):
    """`cotmi train` before its heavy imports, `cotmi plan` for a name outside its table: one line, exit
    2, the flag named, the whole list of names that work offline, one request to the hub."""
    server = CountingHub()
    try:
        proc = run_cotmi([*command, "--model", "google-t5/t5-small"], cwd=tmp_path, HF_HUB_OFFLINE="0",
                         HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"))
    finally:
        server.close()
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("cotmi: error: --model google-t5/t5-small") and proc.stderr.count("\n") == 1
    assert server.connections == 1
    if command == ["plan"]:
        assert "google/flan-t5-xxl" in proc.stderr and "google/t5-v1_1-xxl" in proc.stderr


def env(local_rank: int) -> DistEnv:
    return DistEnv(rank=2 + local_rank, local_rank=local_rank, world_size=4, local_world_size=2,
                   device=torch.device("cpu"))


@pytest.fixture
def waits(monkeypatch):
    """The hub knows every name; the barrier is recorded."""
    calls = []
    monkeypatch.setattr(hub, "ask_hub", lambda name: None)
    return calls


def test_local_rank_0_downloads_and_the_others_wait(waits):
    cfg = load_config(model="google/t5-v1_1-small", tokenizer="google/t5-v1_1-small")
    fetched = {0: [], 1: []}
    for local in (0, 1):
        hub.fetch_once_per_node(cfg, env(local), fetch=fetched[local].append, wait=lambda e: waits.append(e.rank))
    assert fetched == {0: ["google/t5-v1_1-small"], 1: []}
    assert waits == [2, 3]  # both pass the barrier: rank 3 waits there for rank 2's download


def test_a_failed_download_does_not_leave_the_others_waiting(waits):
    def fail(name):
        raise OSError("no network")

    hub.fetch_once_per_node(load_config(model="google/flan-t5-small"), env(0), fetch=fail,
                            wait=lambda e: waits.append(e.rank))
    assert waits == [2]


def test_nothing_is_fetched_offline_for_scratch_local_models_or_one_rank(waits, monkeypatch, tmp_path):
    fetched = []

    def fetch(cfg, dist_env):
        hub.fetch_once_per_node(cfg, dist_env, fetch=fetched.append, wait=lambda e: waits.append(e.rank))

    fetch(load_config(), env(0))
    fetch(load_config(model=str(tmp_path)), env(0))
    fetch(load_config(model="google/flan-t5-small"),
          DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu")))
    monkeypatch.setattr(hub, "ask_hub", lambda name: "unreachable: HF_HUB_OFFLINE=1 is set")
    fetch(load_config(model="google/flan-t5-small"), env(0))
    assert fetched == [] and waits == []
