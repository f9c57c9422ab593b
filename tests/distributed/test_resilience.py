"""Runs that survive: preemption, a rank killed mid-save, NaN losses, resume on another world size,
export. Two chains of launches (each launch builds on the previous one's checkpoints), 5 two-rank
launches and one single-rank run in all.

Per-step losses are compared exactly (fp32 on CPU, TensorBoard's loss/total logged every step):
a resumed run must reproduce the steps an uninterrupted run took from the same checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cotmi_ds.distributed import free_port
from tests.conftest import TINY, child_env, run_cotmi
from tests.tb import read_scalars

pytestmark = pytest.mark.dist
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 600  # generous: the CI machine may be shared
FAULTY = "tests.faults"  # cotmi with the faults that COTMI_FAULT_* describe (tests/faults.py)


def _losses(run: Path) -> dict[int, float]:
    return dict(read_scalars(run / "tb")["loss/total"])


class Launch:
    """Processes started in their own process groups, always cleaned up (also when a test fails)."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.logs = tmp, [], []

    def start(self, cmd: list[str], name: str, **env: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        proc = subprocess.Popen([str(c) for c in cmd], cwd=self.tmp, env=child_env(**env), text=True,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait(self, procs=None, timeout=LAUNCH_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in (procs or self.procs)]

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n" + log.read_text()[-4000:] for log in self.logs)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


@pytest.fixture
def launch(tmp_path):
    launcher = Launch(tmp_path)
    yield launcher
    launcher.close()


def _fused(tmp: Path, name: str) -> Path:
    """A shipped config with torch's fused AdamW, as GPUs get it by default (the fused kernel exists
    on CPUs too): the chains below prove it trains and resumes through DeepSpeed's ZeRO optimizers."""
    from cotmi_ds.ds_configs import read_ds_config

    raw = read_ds_config(name)[0]
    raw["optimizer"]["params"]["fused"] = True
    path = tmp / f"{name}_fused.json"
    path.write_text(json.dumps(raw))
    return path


def _ranks_directly(launch: Launch, args: list, name: str, **env: str) -> list[subprocess.Popen]:
    """Two ranks started the way srun starts them: one process each, ranks in the environment."""
    port = str(free_port())
    return [launch.start([sys.executable, "-m", FAULTY, *args], f"{name}-rank{r}", RANK=str(r),
                         LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port, **env) for r in range(2)]


def _two_nodes(launch: Launch, args: list, name: str, **env: str) -> list[subprocess.Popen]:
    """2 "nodes" x 1 rank on loopback: one torchrun per node, as on a cluster."""
    port = str(free_port())
    return [launch.start([BIN / "torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(n),
                          "--master_addr", "127.0.0.1", "--master_port", port, "-m", FAULTY, *args],
                         f"{name}-node{n}", **env) for n in range(2)]


def test_zero3_preempted_resumed_exported_and_moved_across_world_sizes(tmp_path, launch):
    common = [*TINY, "--ds_config", _fused(tmp_path, "zero3"), "--dropout", "0.1", "--max_steps", "10",
              "--log_every", "1", "--eval_every", "0"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"

    # 1. Rank 0's loss is NaN for micro-batch 1 (both ranks skip it); rank 1 alone gets SIGTERM as
    #    step 6 begins: both finish step 6, save it and exit 75.
    procs = _ranks_directly(launch, ["train", *common, "--save_every", "2", "--keep_last", "2",
                                     "--output_dir", a], "a", COTMI_FAULT_NAN="0:1", COTMI_FAULT_SIGNAL="1:6:SIGTERM")
    assert launch.wait(procs) == [75, 75], launch.output()
    status = json.loads((a / "status.json").read_text())
    assert status["status"] == "preempted" and status["step"] == 6 and status["exit_code"] == 75
    ckpts = a / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-4", "step-6"]  # keep_last 2
    assert (ckpts / "latest").read_text() == "step-6"
    first = _losses(a)
    assert sorted(first) == list(range(1, 7))
    meta = json.loads((ckpts / "step-6" / "cotmi_checkpoint.json").read_text())
    assert meta["trainer"]["skipped_micro_batches"] == 1
    # The skipped micro-batch never reached DeepSpeed: 6 optimizer steps of 2 x 8 examples each.
    assert meta["engine"] == {"global_steps": 6, "global_samples": 96, "skipped_steps": 0}

    # 2. Resume step 4 (a path) on two torchrun "nodes" into a new run: steps 5-6 are the same to the
    #    last bit (model, optimizer, scheduler, dropout RNG per rank, data position), then on to 10.
    procs = _two_nodes(launch, ["train", *common, "--resume", ckpts / "step-4", "--output_dir", b], "b")
    assert launch.wait(procs) == [0, 0], launch.output()
    second = _losses(b)
    assert sorted(second) == list(range(5, 11))
    assert [second[s] for s in (5, 6)] == [first[s] for s in (5, 6)]

    # 3. Export the 2-rank ZeRO-3 checkpoint: same weights as the run's own export, and greedy
    #    generation identical to what the engine predicted in the run's final evaluation (rank 0's
    #    first batch of 8: its share of the longest test examples, padded together as here).
    proc = run_cotmi(["export", b, tmp_path / "hf"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from cotmi_ds.config import load_config
    from cotmi_ds.data.encode import LABEL_PREFIX
    from cotmi_ds.evaluation.generate import evaluation_settings, generate_labels, shard

    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    own = load_file(b / "model" / "model.safetensors")
    assert exported.keys() == own.keys() and all((exported[k] == own[k]).all() for k in own)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    records = [json.loads(line) for line in (b / "predictions" / "step000010-test.jsonl").read_text().splitlines()]
    every_input = tokenizer([LABEL_PREFIX + r["input"] for r in records])["input_ids"]
    first = shard([len(ids) for ids in every_input], 0, 2)[:8]
    batch = [records[i] for i in first]
    inputs = [every_input[i] for i in first]
    import torch

    settings = evaluation_settings(load_config(str(b / "config.yaml")))
    outputs = generate_labels(model, tokenizer, inputs, torch.device("cpu"), settings["max_new_tokens"], synced=False)
    assert outputs == [r["prediction"] for r in batch] and len(outputs) == 8

    # 4. 2 ranks -> 1 (universal checkpoint of step 6, global batch kept at 16). Step 7 continues
    #    from the restored state: close to run b's step 7 (a fresh model would be near 21), not equal
    #    (one rank averages over 16 examples, two average their halves). From step 9 every loss is
    #    NaN: after --max_bad_steps 3 skips the run stops with exit 3, keeping step 8.
    proc = run_cotmi(["train", *common, "--batch_size", "16", "--save_every", "2", "--max_bad_steps", "3",
                      "--resume", a, "--output_dir", c], cwd=tmp_path, timeout=LAUNCH_TIMEOUT,
                     module=FAULTY, COTMI_FAULT_NAN="0:9-99")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NaN/inf in 3 consecutive micro-batches at step 9" in proc.stderr.splitlines()[-1]
    assert (c / "checkpoints" / "latest").read_text() == "step-8"
    assert json.loads((c / "status.json").read_text())["exit_code"] == 3
    third = _losses(c)
    assert abs(third[7] - second[7]) < 0.05 * second[7], (third, second)

    # 5. 1 rank -> 2 (plain torchrun): --resume auto picks up step 8 and finishes.
    port = str(free_port())
    proc = launch.start([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", port, "-m", "cotmi_ds",
                         "train", *common, "--resume", "auto", "--output_dir", c], "c2")
    assert launch.wait([proc]) == [0], launch.output()
    fourth = _losses(c)
    assert abs(fourth[9] - second[9]) < 0.05 * second[9], (fourth, second)
    assert json.loads((c / "results.json").read_text())["world_size"] == 2


def test_zero2_rank_killed_mid_save_then_resume_auto(tmp_path, launch):
    run = tmp_path / "run"
    args = ["train", *TINY, "--ds_config", _fused(tmp_path, "zero2"), "--max_steps", "8", "--save_every", "3", "--log_every", "1",
            "--eval_every", "0", "--dist_timeout_s", "60", "--output_dir", run]

    def deepspeed():
        return [BIN / "deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), "--module"]

    # 1. Rank 1 SIGKILLs itself while saving step 6, after writing its own files. Rank 0 and the
    #    launcher must not hang: they exit well within 60 s of the kill, and step 3 stays `latest`.
    proc = launch.start([*deepspeed(), FAULTY, *args], "killed", COTMI_FAULT_KILL_IN_SAVE="1:6")
    marker = run / "checkpoints" / "step-6.partial" / "rank-1.json"
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), launch.output()
    killed_at = time.monotonic()
    rc = launch.wait([proc], timeout=120)[0]
    assert time.monotonic() - killed_at < 60, launch.output()
    assert rc != 0
    assert (run / "checkpoints" / "latest").read_text() == "step-3"
    before = _losses(run)
    assert sorted(before) == list(range(1, 7))

    # The interrupted save is refused as such; nothing is written.
    proc = run_cotmi(["export", run / "checkpoints" / "step-6.partial", tmp_path / "hf"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "unfinished save" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "hf").exists()

    # 2. The same command with --resume auto continues from step 3: steps 4-6 match exactly.
    proc = launch.start([*deepspeed(), "cotmi_ds", *args, "--resume", "auto"], "resumed")
    assert launch.wait([proc]) == [0], launch.output()
    after = _losses(run)
    assert [after[s] for s in (4, 5, 6)] == [before[s] for s in (4, 5, 6)]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-6", "step-8"]

    # 3. A checkpoint from another model: one line, exit 2, the run directory untouched.
    config_before = (run / "config.yaml").read_bytes()
    proc = run_cotmi([*args, "--resume", "auto", "--scratch_d_model", "48"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "from another model (T5 d_model 32" in proc.stderr.splitlines()[-1]
    assert (run / "config.yaml").read_bytes() == config_before
