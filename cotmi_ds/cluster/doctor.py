"""`cotmi doctor`: the preflight check of a node, with the flags of the training run it precedes.

Each check is one line: ``ok`` with what was found, or ``FAIL`` with what is wrong and how to fix it.
The Slurm templates run it on every node before launching, so that a job fails in seconds instead of
after queueing, loading and (for DeepSpeed's ops) compiling. The checks are plain functions of the
facts they judge, so that each failure can be tested without the hardware that causes it.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cotmi_ds.config import TrainConfig
from cotmi_ds.errors import UsageError


@dataclass
class Check:
    name: str
    detail: str            # what was found
    fix: str | None = None  # set: the check failed; how to fix it

    def line(self) -> str:
        if self.fix is None:
            return f"  ok    {self.name}: {self.detail}"
        return f"  FAIL  {self.name}: {self.detail}; fix: {self.fix}"


def check_torch(torch_version: str, cuda_version: str | None, deepspeed_version: str) -> Check:
    from importlib.metadata import PackageNotFoundError, requires

    floor = "2.4"
    try:  # the floor this package declares
        spec = next(r for r in requires("cotmi_ds") or [] if r.replace(" ", "").startswith("torch>="))
        floor = spec.replace(" ", "").split(">=")[1].split(",")[0]
    except (PackageNotFoundError, StopIteration):
        pass
    detail = f"torch {torch_version} (CUDA {cuda_version or 'none: a CPU build'}), DeepSpeed {deepspeed_version}"
    if _version_tuple(torch_version) < _version_tuple(floor):
        return Check("torch", detail, f"install torch>={floor} (the build for your CUDA driver)")
    return Check("torch", detail)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_gpus(gpus_asked: int, ranks: int, visible: int, cuda_built: bool,
               cuda_visible_devices: str | None) -> Check:
    """GPUs the job asked for (Slurm's count on this node) against those torch sees, and the ranks."""
    cvd = f" (CUDA_VISIBLE_DEVICES={cuda_visible_devices})" if cuda_visible_devices is not None else ""
    if gpus_asked == 0:
        return Check("gpus", f"none asked for: {ranks} CPU rank(s); torch sees {visible} GPU(s){cvd}")
    if visible == 0:
        why = "torch cannot use them" if cuda_built else "this torch is a CPU build"
        fix = ("check the driver with nvidia-smi on this node" if cuda_built else
               "install the CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu126)")
        return Check("gpus", f"{gpus_asked} asked for, none visible{cvd}: {why}", fix)
    if visible < gpus_asked:
        return Check("gpus", f"{gpus_asked} asked for, only {visible} visible{cvd}",
                     "do not narrow CUDA_VISIBLE_DEVICES below Slurm's allocation, or ask for fewer GPUs")
    if ranks > visible:
        return Check("gpus", f"{ranks} ranks per node but {visible} GPU(s) visible{cvd}",
                     f"one rank per GPU: set COTMI_PROCS_PER_NODE={visible} or ask for --gpus-per-node {ranks}")
    return Check("gpus", f"{visible} visible{cvd}, {ranks} rank(s) per node")


def check_bf16(precision: str, on_gpu: bool, bf16_ok: bool, device_name: str) -> Check:
    if precision == "bf16" and on_gpu and not bf16_ok:
        return Check("bf16", f"--precision bf16 but {device_name} has no native bf16 (only emulated, much "
                     "slower)", "use --precision fp32 (or GPUs since Ampere)")
    if not on_gpu:
        note = "fp32 (bf16 on CPUs is only emulated)" if precision != "bf16" else "bf16 asked for, emulated on CPU (slow)"
        return Check("bf16", f"precision {precision} -> {note}")
    return Check("bf16", f"precision {precision}; {device_name} {'supports' if bf16_ok else 'lacks'} bf16")


def check_nccl(on_gpu: bool, nccl_available: bool, nccl_version: str | None) -> Check:
    if not on_gpu:
        return Check("nccl", "not needed (CPU ranks use gloo)")
    if not nccl_available:
        return Check("nccl", "this torch has no NCCL", "install a CUDA build of torch from download.pytorch.org")
    return Check("nccl", f"NCCL {nccl_version}")


def check_ops_line(ds: dict, where: str, device_type: str, probe=None) -> Check:
    from cotmi_ds.ds_configs.ops import REAL_PROBE, op_problem, ops_needed

    needed = ops_needed(ds, device_type)
    if not needed:
        return Check("deepspeed ops", f"{where} needs no compiled op on {device_type} (torch's AdamW)")
    notes = []
    for op in needed:
        fatal, message = op_problem(op, device_type, where, probe or REAL_PROBE)
        if fatal:
            head, _, fix = message.rpartition("; ")
            return Check("deepspeed ops", head, fix)
        if message:  # buildable: the run works, but compiles at start-up on every node
            notes.append(message.split(": ", 1)[1])
    return Check("deepspeed ops", "; ".join(notes) or f"{where} needs {', '.join(needed)}: prebuilt")


def check_model(model: str, cached: bool, offline: bool, problem: str | None) -> Check:
    """--model: scratch, a local folder, or a hub name (in the cache, or downloadable from here).
    ``problem``: what asking the hub gave (model/hub.py's ask_hub; None: it knows the model)."""
    if model == "scratch":
        return Check("model", "scratch (built from a T5Config; nothing to download)")
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            return Check("model", f"{model} is a folder without config.json", "point --model at a saved model folder")
        return Check("model", f"local folder {model}")
    if cached:
        return Check("model", f"{model} is in the Hugging Face cache")
    if offline:
        return Check("model", f"{model} is not in the Hugging Face cache and HF_HUB_OFFLINE=1",
                     f"download it once where there is network, into the cache the nodes share: "
                     f"hf download {model} (HF_HOME=<shared dir>)")
    if problem is None:
        return Check("model", f"{model} is not cached yet: local rank 0 of each node downloads it at start-up")
    if problem.startswith("unreachable"):
        return Check("model", f"{model} is not in the cache and {problem.removeprefix('unreachable: ')}",
                     f"pre-download it (hf download {model}) on a machine with network into a shared "
                     "HF_HOME, then set HF_HUB_OFFLINE=1")
    return Check("model", f"{model}: {problem}", "check the name (a hub id such as google/t5-v1_1-base), "
                 "or point --model at a saved model folder")


def check_data(cfg: TrainConfig) -> Check:
    from cotmi_ds.data import DATASETS
    from cotmi_ds.data.datasets import check_data_files

    if cfg.dataset == "synthetic":
        return Check("data", "synthetic (embedded)")
    own = cfg.dataset not in DATASETS
    try:
        check_data_files(cfg)
    except UsageError as e:
        return Check("data", str(e).split("; ")[0], "fix what it names (docs/own-task.md)" if own else
                     "pass --data_root DIR with the DSS layout, or `cotmi data fetch --to datasets` on a machine "
                     "with network")
    return Check("data", f"{cfg.dataset}: every file present")


def check_run_dir(run_dir: Path, nodes: int, node_id: int, token: str, wait_s: float) -> Check:
    """Writable here, and (several nodes) the same directory on every node: each node leaves a marker
    file and waits to see every other node's."""
    marks = run_dir / ".doctor"
    try:
        marks.mkdir(parents=True, exist_ok=True)
        mine = marks / f"{token}-node{node_id}"
        mine.write_text(socket.gethostname() + "\n")
    except OSError as e:
        return Check("run dir", f"{run_dir} is not writable ({e.strerror})",
                     "choose a writable --output_dir (COTMI_RUN_DIR) on a shared filesystem")
    if nodes <= 1:
        mine.unlink(missing_ok=True)
        try:
            marks.rmdir()
        except OSError:
            pass  # another job's markers
        return Check("run dir", f"{run_dir} is writable")
    deadline = time.monotonic() + wait_s
    while True:
        seen = sorted(p.name for p in marks.glob(f"{token}-node*"))
        if len(seen) >= nodes:
            return Check("run dir", f"{run_dir} is writable and shared by all {nodes} nodes")
        if time.monotonic() > deadline:
            return Check("run dir", f"{run_dir} is not the same directory on every node (node {node_id} sees "
                         f"{len(seen)} of {nodes} nodes' marker files)",
                         "several nodes need a shared filesystem: put the run directory on it")
        time.sleep(0.5)


def checkpoint_bytes(num_params: int, keep_last: int) -> int:
    """Disk for the checkpoints a run keeps: fp32 weights and two Adam moments (12 B a parameter) plus
    the module's weights (4 B), for keep_last checkpoints and the one being written, plus the export."""
    return num_params * 16 * (max(keep_last, 1) + 1) + num_params * 4


def check_disk(run_dir: Path, free: int, num_params: int | None, keep_last: int) -> Check:
    if num_params is None:
        return Check("disk", f"{free / 2**30:.1f} GiB free at {run_dir} (checkpoint size unknown: no model config)")
    need = checkpoint_bytes(num_params, keep_last)
    detail = (f"{free / 2**30:.1f} GiB free at {run_dir}, checkpoints of {num_params / 1e6:.1f}M parameters "
              f"need about {need / 2**30:.1f} GiB")
    if free < need:
        return Check("disk", detail, "free space, put the run directory elsewhere, or lower --keep_last")
    return Check("disk", detail)


def count_params(cfg: TrainConfig) -> int:
    """The student's parameter count, built on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, T5Config

    from cotmi_ds.model.family import student_class

    if cfg.model == "scratch":
        config = T5Config(vocab_size=cfg.scratch_vocab_size, d_model=cfg.scratch_d_model, d_ff=cfg.scratch_d_ff,
                          d_kv=cfg.scratch_d_kv, num_layers=cfg.scratch_num_layers, num_heads=cfg.scratch_num_heads,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:
        from cotmi_ds.model.hub import resolve

        config = AutoConfig.from_pretrained(resolve(cfg.model, "--model", "config"))
    with torch.device("meta"):
        return student_class(config)(config).num_parameters()


def _hub_facts(model: str) -> tuple[bool, bool, str | None]:
    """(in the cache, offline mode, what the hub said): the hub only asked when it matters."""
    from huggingface_hub import constants

    from cotmi_ds.model.hub import ask_hub, cached_folder, is_hub_name

    offline = bool(constants.HF_HUB_OFFLINE)
    if not is_hub_name(model):
        return False, offline, None
    cached = cached_folder(model, "model") is not None
    return cached, offline, None if cached or offline else ask_hub(model)


def run_doctor(cfg: TrainConfig, ranks: int, gpus: int, visible: int, nodes: int, node_id: int, token: str,
               wait_s: float) -> list[Check]:
    import torch

    from cotmi_ds.distributed import settle_ds_accelerator
    from cotmi_ds.ds_configs import choose_ds_config
    from cotmi_ds.ds_configs.precision import native_bf16, precision_for

    settle_ds_accelerator()
    import deepspeed

    on_gpu = gpus > 0
    checks = [
        check_torch(torch.__version__, torch.version.cuda, deepspeed.__version__),
        check_gpus(gpus, ranks, visible, torch.version.cuda is not None, os.environ.get("CUDA_VISIBLE_DEVICES")),
    ]
    if visible and on_gpu:  # what the trainer's ranks will decide (ds_configs/precision.py)
        bf16_ok, name = native_bf16(torch.device("cuda", 0)), torch.cuda.get_device_name(0)
    else:
        bf16_ok, name = False, "CPU"
    checks.append(check_bf16(precision_for(cfg.precision, bf16_ok), on_gpu and visible > 0, bf16_ok, name))
    nccl_ok = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    nccl_version = ".".join(map(str, torch.cuda.nccl.version())) if nccl_ok and visible else None
    checks.append(check_nccl(on_gpu, nccl_ok, nccl_version))
    chosen = choose_ds_config(cfg.ds_config, ranks * nodes)
    checks.append(check_ops_line(chosen.raw, Path(chosen.where).name, "cuda" if on_gpu else "cpu"))
    model = check_model(cfg.model, *_hub_facts(cfg.model))
    checks.append(model)
    checks.append(check_data(cfg))
    run_dir = Path(cfg.output_dir or "runs")
    checks.append(check_run_dir(run_dir, nodes, node_id, token, wait_s))
    num_params = None
    if model.fix is None:
        try:
            num_params = count_params(cfg)
        except (OSError, ValueError, UsageError):
            pass  # not downloadable yet: the model check says so
    existing = run_dir if run_dir.exists() else Path(".")
    checks.append(check_disk(run_dir, shutil.disk_usage(existing).free, num_params, cfg.keep_last))
    return checks


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


def doctor(cfg: TrainConfig, ranks: int | None, gpus: int | None, nodes: int | None, wait_s: float) -> int:
    """Print every check; return the number that failed. GPUs asked for: Slurm's count on this node,
    else those torch sees."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = _env_int("SLURM_GPUS_ON_NODE", visible) if gpus is None else gpus
    ranks = ranks if ranks is not None else (gpus or 1)
    nodes = _env_int("SLURM_NNODES", 1) if nodes is None else nodes
    node_id = _env_int("SLURM_NODEID", 0)
    token = f"{os.environ.get('SLURM_JOB_ID', os.getpid())}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    print(f"cotmi doctor on {socket.gethostname()} (node {node_id + 1} of {nodes}): {gpus} GPU(s) asked for, "
          f"{ranks} rank(s) per node", flush=True)
    checks = run_doctor(cfg, ranks, gpus, visible, nodes, node_id, token, wait_s)
    for check in checks:
        print(check.line(), flush=True)
    failed = sum(c.fix is not None for c in checks)
    print(f"doctor: {failed} of {len(checks)} checks failed" if failed else f"doctor: all {len(checks)} checks passed",
          flush=True)
    return failed
