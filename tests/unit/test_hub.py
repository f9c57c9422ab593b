"""Hub models: one download per node (local rank 0), the other ranks wait; nothing fetched offline,
for scratch or local models, or on a single rank."""
import pytest
import torch

from cotmi_ds.config import load_config
from cotmi_ds.distributed import DistEnv
from cotmi_ds.model import hub


def env(local_rank: int) -> DistEnv:
    return DistEnv(rank=2 + local_rank, local_rank=local_rank, world_size=4, local_world_size=2,
                   device=torch.device("cpu"))


@pytest.fixture
def waits(monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "barrier", lambda e: calls.append(e.rank))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return calls


def test_local_rank_0_downloads_and_the_others_wait(waits):
    cfg = load_config(model="google/t5-v1_1-small", tokenizer="google/t5-v1_1-small")
    fetched = {0: [], 1: []}
    for local in (0, 1):
        hub.fetch_once_per_node(cfg, env(local), fetch=fetched[local].append)
    assert fetched == {0: ["google/t5-v1_1-small"], 1: []}
    assert waits == [2, 3]  # both pass the barrier: rank 3 waits there for rank 2's download


def test_a_failed_download_does_not_leave_the_others_waiting(waits):
    def fail(name):
        raise OSError("no network")

    hub.fetch_once_per_node(load_config(model="google/flan-t5-small"), env(0), fetch=fail)
    assert waits == [2]


def test_nothing_is_fetched_offline_for_scratch_local_models_or_one_rank(waits, monkeypatch, tmp_path):
    fetched = []
    hub.fetch_once_per_node(load_config(), env(0), fetch=fetched.append)
    hub.fetch_once_per_node(load_config(model=str(tmp_path)), env(0), fetch=fetched.append)
    one = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    hub.fetch_once_per_node(load_config(model="google/flan-t5-small"), one, fetch=fetched.append)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hub.fetch_once_per_node(load_config(model="google/flan-t5-small"), env(0), fetch=fetched.append)
    assert fetched == [] and waits == []
