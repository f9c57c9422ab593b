"""Which device a rank trains on: what it can see, and what DeepSpeed's accelerator is; and the test
processes stay on CPUs on a machine with GPUs."""
import os

import pytest
import torch

from cotmi_ds.distributed import choose_device
from cotmi_ds.errors import UsageError
from tests.conftest import child_env


@pytest.mark.parametrize("local_rank, visible, expected", [
    (0, 1, torch.device("cuda", 0)),
    (3, 1, torch.device("cuda", 0)),  # srun --gpus-per-task: the task's one GPU is device 0
    (1, 4, torch.device("cuda", 1)),  # all the node's GPUs visible: the local rank's
    (3, 4, torch.device("cuda", 3)),
])
def test_gpu_is_chosen_among_the_visible_ones(local_rank, visible, expected):
    assert choose_device(local_rank, True, visible, None) == expected


def test_a_local_rank_without_a_gpu_is_named():
    with pytest.raises(UsageError, match=r"local rank 2 has no GPU: this process sees 2 \(CUDA_VISIBLE_DEVICES="):
        choose_device(2, True, 2, None)


@pytest.mark.parametrize("cuda, accelerator", [(False, None), (False, "cpu"), (True, "cpu")])
def test_cpu_without_cuda_or_when_deepspeed_is_told_cpu(cuda, accelerator):
    # (True, "cpu"): the test suite on a GPU machine, and the deepspeed launcher's CPU ranks, which it
    # numbers through CUDA_VISIBLE_DEVICES: the device agrees with DeepSpeed's accelerator.
    assert choose_device(1, cuda, 2 if cuda else 0, accelerator) == torch.device("cpu")


def test_test_processes_see_no_gpu_and_use_deepspeeds_cpu_accelerator():
    env = child_env()
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["DS_ACCELERATOR"] == "cpu"


def test_init_distributed_stays_on_cpu_where_torch_sees_gpus(monkeypatch):
    """As on a GPU machine (torch.cuda faked): with the test processes' environment the rank is a
    CPU rank; nothing is asked of the (absent) GPUs."""
    import cotmi_ds.distributed as distributed

    chosen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.setdefault("set", device))
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    monkeypatch.setattr(os, "environ", {**environ, "DS_ACCELERATOR": "cpu"})  # what it sets stays in the copy
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no process group needed
    env = distributed.init_distributed(10)
    assert env.device == torch.device("cpu") and "set" not in chosen


def test_srun_rank_with_one_bound_gpu_uses_device_0_everywhere(monkeypatch):
    """Rank 1 of 2 started by srun with one GPU per task (torch.cuda and the process group faked):
    LOCAL_RANK is 1, the GPU it sees is device 0, and that is the device set and the one the NCCL
    group is bound to (DeepSpeed would bind LOCAL_RANK's)."""
    import cotmi_ds.distributed as distributed

    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.setdefault("group", (backend, kw["device_id"])))
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: calls.setdefault("gloo", []).append(kw) or kw)
    monkeypatch.setattr(distributed, "_patient_group", None)
    monkeypatch.setattr(distributed, "_host_group", None)
    import deepspeed

    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.setdefault("deepspeed", True))
    srun = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "node1",
            "MASTER_PORT": "29500", "PATH": os.environ.get("PATH", "")}
    monkeypatch.setattr(os, "environ", srun)
    env = distributed.init_distributed(10)
    assert (env.rank, env.local_rank, env.world_size) == (1, 1, 2)
    assert env.device == torch.device("cuda", 0) == calls["set_device"]
    assert calls["group"] == ("nccl", torch.device("cuda", 0)) and calls["deepspeed"]
    # Rank 0's solo work is awaited on a CPU group, and host numbers are summed on another one (with
    # the run's timeout): neither touches the GPU.
    assert [(kw["backend"], kw["timeout"].total_seconds()) for kw in calls["gloo"]] == [
        ("gloo", distributed.SOLO_WORK_TIMEOUT_S), ("gloo", 10)]
    assert distributed._host_group is calls["gloo"][1]
