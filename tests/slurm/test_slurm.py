"""The Slurm templates, as users get them, on a real two-node Slurm (tests/slurm/cluster.sh) whose
nodes have 2 fake GPUs each (generic resources backed by device files: Slurm allocates them and sets
CUDA_VISIBLE_DEVICES; the ranks train on CPUs).

Only resources and the tiny CPU training config are overridden. Nothing here is timed: the two
"nodes" share this machine's cores, and no test depends on how fast a job runs. Every daemon is stopped and every namespace removed by the
module fixture, also when a test fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, child_env
from tests.tb import read_scalars

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
RESOURCES = ["--cpus-per-task", 1, "--mem", "1G"]  # the templates' defaults ask for more than a CI "node" has
_FLAGS = {**dict(zip(TINY[::2], TINY[1::2])), "--eval_every": "0", "--synthetic_eval_size": "16"}
TRAIN = [word for pair in _FLAGS.items() for word in pair]  # the tiny CPU config, evaluated only at the end


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("a Slurm cluster in network namespaces needs root and iproute2")
    # munged wants every directory above its socket world-executable; pytest's temp dirs are 0700.
    state = Path(tempfile.mkdtemp(prefix="cotmi-slurm-", dir="/tmp"))
    env = {**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"}
    up = subprocess.run(["bash", str(CLUSTER), "up", str(state)], capture_output=True, text=True, env=env,
                        timeout=600)
    try:
        if up.returncode != 0:
            pytest.fail(f"cluster.sh up failed: {up.stderr[-2000:]}")
        job_env = child_env(SLURM_CONF=up.stdout.strip().splitlines()[-1], COTMI_PROCS_PER_NODE="1",
                            PATH=f"{Path(sys.executable).parent}:{env['PATH']}", PYTHONPATH=str(REPO))
        yield job_env
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(state)], capture_output=True, env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def sbatch(env: dict, args: list, **extra: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *map(str, RESOURCES + args)], capture_output=True, text=True,
                          env={**env, **extra}, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> list[dict[str, str]]:
    """`scontrol show job -o` as dicts (one per array task)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_for(env: dict, job: str, limit_s: float = 600, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY")) -> list[dict]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        info = job_info(env, job)
        if info and all(i.get("JobState") in done for i in info):
            return info
        time.sleep(2)
    raise AssertionError(f"job {job} not finished after {limit_s} s: {job_info(env, job)}")


def wait_for_text(path: Path, pattern: str, limit_s: float = 600) -> re.Match:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and (m := re.search(pattern, path.read_text(errors="replace"))):
            return m
        time.sleep(1)
    raise AssertionError(f"{pattern!r} never appeared in {path}")


def template(tmp: Path, name: str) -> Path:
    """The user's copy: `cotmi slurm template NAME > job.sbatch`."""
    copy = tmp / f"{name}.sbatch"
    out = subprocess.run([sys.executable, "-m", "cotmi_ds", "slurm", "template", name], capture_output=True,
                         text=True, env=child_env(), timeout=60, check=True).stdout
    copy.write_text(out)
    return copy


def multinode(env: dict, run_dir: Path, train_args: list, resources: tuple = (), **extra: str) -> str:
    return sbatch(env, ["--nodes", 2, "--time", 10, *resources, "--output", run_dir.parent / f"{run_dir.name}.out",
                        template(run_dir.parent, "multinode"), *train_args], COTMI_RUN_DIR=str(run_dir), **extra)


def test_two_node_job_gives_each_rank_its_nodes_gpus(slurm, tmp_path):
    run = tmp_path / "run"
    # --gpus-per-node 2: two ranks per node, each seeing the node's two GPUs. (The doctor would stop
    # this job: torch sees no GPU here; see the next test.)
    job = multinode(slurm, run, [*TRAIN, "--max_steps", 12, "--log_every", 4, "--save_every", 6],
                    ("--gpus-per-node", 2), COTMI_PROCS_PER_NODE="", COTMI_SKIP_DOCTOR="1",
                    COTMI_MODULE="tests.faults", COTMI_FAULT_REPORT_ENV="1")
    info = wait_for(slurm, job)
    log = (run / "slurm.log").read_text()
    assert info[0]["JobState"] == "COMPLETED", log[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 4 and results["steps"] == 12
    assert [s for s, _ in read_scalars(run / "tb")["loss/total"]] == [4, 8, 12]
    assert "2 nodes x 2 ranks, rendezvous n1:" in log and "status completed" in log
    ranks = re.findall(r"^rank (\d) of (\d) on (n\d): CUDA_VISIBLE_DEVICES=(\S+)$", log, re.M)
    assert sorted(r[0] for r in ranks) == ["0", "1", "2", "3"] and {r[1] for r in ranks} == {"4"}, ranks
    assert sorted(r[2] for r in ranks) == ["n1", "n1", "n2", "n2"] and {r[3] for r in ranks} == {"0,1"}


def test_the_doctor_stops_a_job_in_seconds_with_the_fix(slurm, tmp_path):
    run = tmp_path / "run"
    job = sbatch(slurm, ["--gpus-per-node", 1, "--time", 10, "--output", tmp_path / "job.out",
                         template(tmp_path, "singlenode"), *TRAIN, "--max_steps", 5],
                 COTMI_RUN_DIR=str(run), COTMI_PROCS_PER_NODE="")
    info = wait_for(slurm, job, limit_s=300)
    log = (run / "slurm.log").read_text()
    assert info[0]["JobState"] == "FAILED", log[-3000:]
    assert "FAIL  gpus: 1 asked for, none visible (CUDA_VISIBLE_DEVICES=" in log and "fix: " in log
    assert "cotmi doctor failed (above); not launching" in log and not (run / "config.yaml").exists()


def test_two_node_job_preempted_requeued_and_resumed_to_completion(slurm, tmp_path):
    run = tmp_path / "run"
    held = tmp_path / "held"
    # Rank 0 holds step 8 until USR1 reaches it and says so in `held`: the signal lands at step 8
    # however fast or slow the job runs, and the test waits on that acknowledgement, not on a step.
    job = multinode(slurm, run, [*TRAIN, "--max_steps", 16, "--log_every", 1, "--save_every", 100],
                    COTMI_MODULE="tests.faults", COTMI_FAULT_HOLD=f"0:8:SIGUSR1:{held}")
    deadline = time.monotonic() + 600
    while not held.exists():
        assert time.monotonic() < deadline and job_info(slurm, job)[0]["JobState"] in ("PENDING", "RUNNING"), \
            (run / "slurm.log").read_text()[-3000:] if (run / "slurm.log").exists() else job_info(slurm, job)
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    info = wait_for(slurm, job)
    log = (run / "slurm.log").read_text()
    assert info[0]["JobState"] == "COMPLETED" and info[0]["Restarts"] == "1", log[-3000:]
    assert "2 nodes x 1 ranks, rendezvous n1:" in log
    assert "USR1: asking every rank to checkpoint and stop" in log and "status preempted" in log
    assert "requeueing job" in log and "(restart 1)" in log
    assert log.count("doctor: all 9 checks passed") == 4  # both nodes, before both runs
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+)", log).group(1))
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert stopped == resumed == 8
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 16 and "status completed" in log
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 16
    # One loss per step, 1..16: the rerun continued from the checkpoint, nothing repeated or lost.
    curve = read_scalars(run / "tb")["loss/total"]
    assert [s for s, _ in curve] == list(range(1, 17))
    losses = [v for _, v in curve]
    assert sum(losses[resumed:resumed + 5]) / 5 < sum(losses[:5]) / 5  # picks up a trained model


def test_a_failing_rank_ends_the_job(slurm, tmp_path):
    run = tmp_path / "run"
    # Rank 1 (on the second node) kills itself as step 5 begins; rank 0 would wait in a collective.
    # (The doctor's runs before a launch are checked by the other multi-node jobs.)
    job = multinode(slurm, run, [*TRAIN, "--max_steps", 200, "--log_every", 1, "--dist_timeout_s", 900],
                    COTMI_SKIP_DOCTOR="1", COTMI_MODULE="tests.faults", COTMI_FAULT_SIGNAL="1:5:SIGKILL")
    info = wait_for(slurm, job, limit_s=300)
    assert info[0]["JobState"] == "FAILED", info  # ended by the failure, not by the time limit
    log = (run / "slurm.log").read_text()
    assert "step 4/200 " in log and "step 5/200 " not in log, log[-3000:]  # it trained, then died at 5
    assert not (run / "results.json").exists()


def test_sweep_array_one_gpu_per_task_a_preempted_task_requeues_alone_and_report(slurm, tmp_path):
    grid = tmp_path / "grid.yaml"
    fixed = {k.lstrip("-"): v for k, v in zip(TRAIN[::2], TRAIN[1::2])}
    fixed.update(max_steps=30, log_every=1, save_every=100)
    grid.write_text(json.dumps({"fixed": fixed, "grid": {"mode": ["dss", "mi"]}}))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "cotmi_ds", "sweep", str(grid), "--out", str(out), "--submit",
           f"--sbatch_args=--time 10 --gpus-per-node 1 {' '.join(map(str, RESOURCES))}"]
    env = {**slurm, "COTMI_PROCS_PER_NODE": "", "COTMI_SKIP_DOCTOR": "1", "COTMI_MODULE": "tests.faults",
           "COTMI_FAULT_REPORT_ENV": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted job array (\d+)", proc.stdout).group(1)
    # Preempt the task whose job id is the array's own: `scontrol requeue <that id>` would requeue
    # every task of the array.
    deadline = time.monotonic() + 300
    while len(info := job_info(slurm, job)) < 2 or any(i.get("JobState") == "PENDING" for i in info):
        assert time.monotonic() < deadline, info
        time.sleep(2)
    task = next(i["ArrayTaskId"] for i in info if i["JobId"] == i["ArrayJobId"])
    other = "1" if task == "0" else "0"
    cell = {"0": "mode-dss", "1": "mode-mi"}
    wait_for_text(out / "runs" / cell[task] / "slurm.log", r"step 8/30 ")
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_{task}"], env=slurm, check=True)
    info = {i["ArrayTaskId"]: i for i in wait_for(slurm, job)}
    assert {i["JobState"] for i in info.values()} == {"COMPLETED"}, info
    assert (info[task]["Restarts"], info[other]["Restarts"]) == ("1", "0"), info
    preempted, untouched = ((out / "runs" / cell[t] / "slurm.log").read_text() for t in (task, other))
    assert f"requeueing job {job}_{task}" in preempted and "(restart 1)" in preempted, preempted[-3000:]
    assert "resumed from " in preempted
    assert "requeueing" not in untouched and "(restart 1)" not in untouched
    # Each run's one rank sees the one GPU Slurm gave its task; the first runs of both tasks ran at
    # the same time: on one node, on two different GPUs.
    seen = [re.findall(r"^rank 0 of 1 on (n\d): CUDA_VISIBLE_DEVICES=(\d)$", text, re.M)
            for text in (preempted, untouched)]
    assert [len(s) for s in seen] == [2, 1], (seen, preempted[-3000:])
    if seen[0][0][0] == seen[1][0][0]:
        assert seen[0][0][1] != seen[1][0][1], seen
    runs = sorted((out / "runs").iterdir())
    assert [r.name for r in runs] == ["mode-dss", "mode-mi"]
    report = subprocess.run([sys.executable, "-m", "cotmi_ds", "report", *map(str, runs), "--output_dir",
                             str(tmp_path)], capture_output=True, text=True, env=slurm, timeout=120)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "report.md").read_text()
    assert re.search(r"^\| dss \|", table, re.M) and re.search(r"^\| mi \|", table, re.M), table
    # Resubmitting skips the finished cells.
    again = subprocess.run(cmd, capture_output=True, text=True, env=slurm, cwd=REPO, timeout=120)
    assert again.returncode == 0 and "all 2 cells" in again.stdout and "nothing to submit" in again.stdout


def test_teach_job_serves_the_teacher_runs_cotmi_teach_against_it_and_stops_it(slurm, tmp_path):
    from benchmarks.teach_bench import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "lm")
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"input": f"What is {i} plus 1?", "label": str(i + 1)}) + "\n" for i in range(6)))
    # `transformers serve` on the CPU stands in for `vllm serve`; two replicas: two endpoints for one job.
    serve = 'transformers serve "$MODEL" --host 127.0.0.1 --port "$PORT" --device cpu'
    job = sbatch(slurm, ["--time", 10, "--chdir", tmp_path, "--output", tmp_path / "job.out", template(tmp_path, "teach"),
                         "--dataset", data, "--task", "numeric", "--out", tmp_path / "teach", "--max_tokens", 8,
                         "--filter", "keep_all"],
                 COTMI_TEACHER_MODEL=str(model), COTMI_TEACHER_REPLICAS="2", COTMI_SERVER_CMD=serve,
                 COTMI_SERVER_WAIT_S="300")
    info = wait_for(slurm, job, limit_s=400)
    log = (tmp_path / "job.out").read_text()
    assert info[0]["JobState"] == "COMPLETED", log[-3000:]
    urls = re.search(r"teacher ready at (\S+)", log).group(1).split(",")
    assert len(urls) == 2 and "cotmi teach finished: exit code 0" in log and "teacher server(s) stopped" in log
    manifest = json.loads((tmp_path / "teach" / "manifest.json").read_text())
    assert manifest["teacher"]["endpoints"] == urls and manifest["splits"]["train"]["rows"] == 6
    for i in range(2):  # both servers answered, and were stopped by the job, not by the test
        server_log = (tmp_path / f"server-{job}-{i}.log").read_text()
        assert '"POST /v1/chat/completions HTTP/1.1" 200' in server_log and "Shutting down" in server_log
