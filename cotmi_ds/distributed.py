"""Ranks, process-group start-up and the few collectives the trainer needs.

This is the one place that reads the launcher's environment (the deepspeed launcher, torchrun and
Slurm all describe ranks through variables) and the one place that asks "am I rank 0?".
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cotmi_ds.errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    subnormals_flushed: bool = False  # in this process's CPU arithmetic (flush_subnormals)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip().lstrip("-").isdigit():
            return int(os.environ[name])
    return default


# Waits for work rank 0 does alone (the first tokenization of a large dataset, a universal
# checkpoint conversion) are not bounded by --dist_timeout_s: they go through a second, gloo group
# with this timeout. They still end at once when rank 0 dies: its connections close.
SOLO_WORK_TIMEOUT_S = 24 * 3600
_patient_group = None
# Numbers the host holds (a stop flag, the logged sums once read) are summed over a gloo group with
# the usual timeout when the ranks otherwise talk NCCL: on the host, without copying them to the GPU
# and back (each copy of pageable memory waits for the GPU's queue to drain).
_host_group = None


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it). Another process may take it
    before it is used; to hand a port to a child process, use ``reserved_port``."""
    with reserved_port() as port:
        return port


@contextmanager
def reserved_port(host: str = "127.0.0.1"):
    """A port held for a child process while the block runs: bound here with SO_REUSEADDR but never
    listening, so the OS gives it to nobody else (no bind-close race), while a server that sets
    SO_REUSEADDR itself (torch's TCPStore, TensorBoard, http.server) can still bind and listen on
    it. Keep the block open until the child has bound the port, e.g. for the whole launch."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        yield s.getsockname()[1]


def choose_device(local_rank: int, cuda_available: bool, visible: int, ds_accelerator: str | None) -> torch.device:
    """This rank's device. CPU without CUDA, or when DeepSpeed is told to use its CPU accelerator
    (DS_ACCELERATOR=cpu: the two must agree). On GPUs the device among those this process sees: the
    only one when one is visible (srun --gpus-per-task or a device cgroup binds one GPU per task,
    which then is device 0 whatever the local rank), else the local rank's."""
    if not cuda_available or ds_accelerator == "cpu":
        return torch.device("cpu")
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise UsageError(f"local rank {local_rank} has no GPU: this process sees {visible} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                         "as many ranks per node as GPUs, or bind one GPU per task")
    return torch.device("cuda", local_rank)


def flush_subnormals(on: bool) -> bool:
    """Treat subnormal floats (below 1.2e-38 in fp32 and bf16) as zero in this process's CPU arithmetic
    (x86's FTZ/DAZ, as TensorFlow runs its CPU kernels), or stop doing so. x86 cores run a multiply-add
    that reads or writes a subnormal up to 100x slower, and a softmax over 32k tokens with large logits
    is largely subnormal: its GEMMs in the loss's backward ran 5-10x slower on CPUs. Results differ only
    where a value below 1.2e-38 would have entered a sum, far under fp32's rounding of the sums.

    The mode is per thread, and OpenMP's worker threads copy it when they are created: call this before
    anything runs on several threads (torch.set_num_threads included). Returns whether every thread
    flushes, probed with a parallel multiply of subnormals; where one does not (a pool made before, a
    CPU without the mode), none does: the results must not depend on which thread summed what."""
    if not torch.set_flush_denormal(on) or not on:
        return False
    # The smallest subnormal by its bits (a converted 1e-39 would already be flushed); the multiply is
    # split over every thread of the pool.
    probe = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)
    if probe.mul_(1.0).count_nonzero():
        torch.set_flush_denormal(False)
        return False
    return True


def numerics(env: DistEnv) -> dict[str, str | int]:
    """What a run's figures depend on besides its flags and world size: with these the same, a run
    repeats bit for bit; another torch build, CPU (its vector kernels), thread count or subnormal mode
    sums in another order or rounds differently, which a few hundred steps grow into other figures."""
    if env.device.type == "cuda":
        return {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(env.device),
                "cuda": torch.version.cuda or "none"}
    return {"torch": torch.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "subnormals": "flushed" if env.subnormals_flushed else "kept"}


def settle_ds_accelerator() -> None:
    """Tell DeepSpeed to use its CPU accelerator where torch sees no GPU, before DeepSpeed is first
    imported (it picks one at import). Left to guess, it picks the same and prints a warning among
    the commands' own lines."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(timeout_s: int, subnormals_flushed: bool = True) -> DistEnv:
    """Start (or join) the process group and pick this rank's device; first of all, set whether
    subnormals are flushed (``flush_subnormals``), before any thread pool exists.

    Works under the deepspeed launcher and torchrun (RANK/LOCAL_RANK/WORLD_SIZE), Slurm's srun
    (SLURM_PROCID/...), and as a plain single process (a 1-rank group on a free loopback port).
    """
    flushed = flush_subnormals(subnormals_flushed)
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    if "RANK" not in os.environ:  # plain `cotmi train`: a group of one
        # Port 0: its store binds whatever port the OS gives (nobody else connects), so there is no
        # window in which another process could take the port first.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    rank = _env_int("RANK", default=0)
    local_rank = _env_int("LOCAL_RANK", default=0)
    world_size = _env_int("WORLD_SIZE", default=1)
    # torchrun: LOCAL_WORLD_SIZE; deepspeed launcher: LOCAL_SIZE; srun: SLURM_NTASKS_PER_NODE.
    local_world_size = _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", default=1)

    cuda = torch.cuda.is_available()
    device = choose_device(local_rank, cuda, torch.cuda.device_count() if cuda else 0,
                           os.environ.get("DS_ACCELERATOR"))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before anything touches a GPU: else every rank creates a context on GPU 0
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR is settled: the accelerator is chosen at import

    if device.type == "cpu":
        # Ranks on one host share its cores; oversubscribed OpenMP threads made ZeRO-3 6x slower.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))
        # DeepSpeed's shared-memory all-reduce costs a ~60 s compile on first use and leaks
        # /dev/shm buffers under the launcher; gloo is what CPU training needs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        if device.type == "cuda" and world_size > 1:
            # DeepSpeed would bind NCCL to the GPU numbered LOCAL_RANK; it adopts a group started here.
            dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=device)
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=False)
    global _patient_group, _host_group
    if world_size > 1 and _patient_group is None:
        _patient_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=SOLO_WORK_TIMEOUT_S))
        if device.type == "cuda":  # the default group is NCCL's
            _host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size,
                   local_world_size=local_world_size, device=device, subnormals_flushed=flushed)


def broadcast_bytes(payload: bytes | None, env: DistEnv, after_solo_work: bool = False) -> bytes:
    """Rank 0's bytes on every rank (e.g. a tokenizer trained once on rank 0). ``after_solo_work``:
    rank 0 may arrive much later than the others (see SOLO_WORK_TIMEOUT_S)."""
    if env.world_size == 1:
        assert payload is not None
        return payload
    box = [payload]
    dist.broadcast_object_list(box, src=0, group=_patient_group if after_solo_work else None)
    return box[0]


def broadcast_str(value: str | None, env: DistEnv, after_solo_work: bool = False) -> str:
    return broadcast_bytes(None if value is None else value.encode(), env, after_solo_work).decode()


def on_main(fn, env: DistEnv):
    """``fn()`` on rank 0 alone (it may take long: the others wait as after_solo_work); a UsageError
    there is raised on every rank (none waits forever). Returns fn's result on rank 0, else None."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except UsageError as e:
            error = str(e)
    status = broadcast_str(("E" + error) if error is not None else "K", env, after_solo_work=True)
    if status.startswith("E"):
        raise UsageError(status[1:])
    return result


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum of float64 values over ranks (exact for integer counts below 2**53), on the hosts."""
    t = torch.tensor(values, dtype=torch.float64)
    if env.world_size > 1:
        dist.all_reduce(t, group=_host_group)  # None: the default group, gloo already
    return t.tolist()


def all_gather_objects(obj, env: DistEnv) -> list:
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv, after_solo_work: bool = False) -> None:
    """``after_solo_work``: rank 0 may arrive much later than the others (see SOLO_WORK_TIMEOUT_S)."""
    if env.world_size > 1:
        dist.barrier(group=_patient_group if after_solo_work else None)


def shutdown(engine=None) -> None:
    """Leave in order: release the DeepSpeed engine (its optimizer's and checkpoint engine's
    resources), wait until every rank is done with the process group (rank 0 hosts its store: a
    rank that tore it down while another still used it made that one abort at exit), then destroy
    the group and its threads before the interpreter's own teardown."""
    global _patient_group, _host_group
    if engine is not None:
        engine.destroy()
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError:  # a rank is already gone: nothing left to wait for
                pass
        import deepspeed.comm as ds_comm

        # DeepSpeed's destroy also drops its cached copies of the groups: a later run in this
        # process (a wrapper that trains twice, the tests) would otherwise use a destroyed one.
        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    _patient_group = _host_group = None


__all__ = ["DistEnv", "free_port", "reserved_port", "init_distributed", "broadcast_bytes", "broadcast_str", "on_main",
           "all_reduce_sum", "all_gather_objects", "barrier", "shutdown"]
