"""Single-process runs that must never publish bad state or lose work: updates skipped for any
reason are counted and stop the run, a diverged optimizer never becomes `latest`, `--overwrite`
replaces only what cotmi wrote, a full disk is one line, a stop request during evaluation and a
storm of them still save. Each run is a tiny ZeRO-0 (or ZeRO-2) model, ~10 s."""
import json
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import TINY, child_env, kill_group, run_cotmi

FAULTY = "tests.faults"  # cotmi with the faults that COTMI_FAULT_* describe (tests/faults.py)


def _args(tmp_path, run, *args) -> list[str]:
    return ["train", *TINY, "--ds_config", "zero0", "--eval_every", "0", "--log_every", "1",
            "--data_cache_dir", str(tmp_path / "cache"), "--output_dir", str(run), *map(str, args)]


def _train(tmp_path, run, *args, module="cotmi_ds", **env):
    return run_cotmi(_args(tmp_path, run, *args), cwd=tmp_path, timeout=300, module=module, **env)


def _launch(tmp_path, run, *args, module="cotmi_ds", **env) -> subprocess.Popen:
    """The same command as _train, started and left running (in its own session)."""
    return subprocess.Popen([sys.executable, "-m", module, *_args(tmp_path, run, *args)], cwd=tmp_path,
                            env=child_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _out(proc) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


def test_overwrite_replaces_only_what_cotmi_wrote_and_a_full_disk_is_one_line(tmp_path):
    # An old run (a directory cotmi marked), beside a file of the user's. Once the new run has started,
    # nothing of the old run remains (its status.json would make a sweep skip the cell, its checkpoints
    # would make --resume auto continue it under the new settings); the user's file stays. Then the disk
    # fills up while step 2 is saved: one line naming the last good checkpoint, exit 2, nothing partial.
    run = tmp_path / "run"
    (run / "checkpoints" / "step-9").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-9")
    (run / "status.json").write_text('{"status": "completed", "step": 9, "exit_code": 0}')
    (run / "config.yaml").write_text("old: true\n")
    (run / "cotmi_run.json").write_text('{"format": "cotmi-run/1"}')
    (run / "notes.txt").write_text("the user's")
    proc = _train(tmp_path, run, "--overwrite", "true", "--max_steps", "3", "--save_every", "1", module=FAULTY,
                  COTMI_FAULT_NO_SPACE="0:2")
    assert proc.returncode == 2, _out(proc)
    assert proc.stderr.splitlines()[-1] == (
        f"cotmi: error: no space left on {run / 'checkpoints'}: checkpoint step-2 was not saved; last good "
        f"checkpoint: {run / 'checkpoints' / 'step-1'}; free some space, then continue with --resume auto")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "cotmi_run.json", "cotmi_run.lock",
                                                     "ds_config.json", "notes.txt", "status.json", "tb", "tokenizer"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-1"]
    assert (run / "checkpoints" / "latest").read_text() == "step-1"
    assert "old: true" not in (run / "config.yaml").read_text() and (run / "notes.txt").read_text() == "the user's"
    assert json.loads((run / "status.json").read_text())["status"] == "no_space"


def test_any_number_of_stop_signals_still_end_in_75_after_the_save(tmp_path):
    # SIGTERM every 20 ms from the moment step 1 is held until the process has gone: during the step,
    # the save, the exit and the interpreter's teardown (where the default handler, death by the
    # signal, used to come back).
    held = tmp_path / "held"
    proc = _launch(tmp_path, tmp_path / "run", "--max_steps", "50", module=FAULTY,
                   COTMI_FAULT_HOLD=f"0:1:SIGTERM:{held}")
    try:
        while not held.exists() and proc.poll() is None:
            time.sleep(0.05)
        while proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGTERM after step 1" in err.splitlines()[-1]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["exit_code"] == 75
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-1"


def test_updates_deepspeed_skips_are_counted_everywhere_and_stop_the_run(tmp_path):
    # At ZeRO-2 with lr 1e30 the first update blows the weights up; from step 2 on every gradient
    # is non-finite and DeepSpeed skips the update ("OVERFLOW! Skipping step").
    from tests.tb import read_scalars

    run = tmp_path / "run"
    proc = _train(tmp_path, run, "--ds_config", "zero2", "--lr", "1e30", "--max_steps", "3", "--save_every", "0")
    assert proc.returncode == 0, _out(proc)
    results = json.loads((run / "results.json").read_text())
    assert results["skipped_updates"] == 2 and results["skipped_micro_batches"] == 0
    assert [v for _, v in read_scalars(run / "tb")["optim/skipped_updates"]] == [0, 1, 2]
    assert "step 3/3 | " in proc.stdout and "skipped so far: 0 micro-batches, 2 updates" in proc.stdout

    # The same policy as for non-finite losses: --max_bad_steps skipped updates in a row end the run
    # with exit 3. Saving every step, no checkpoint holds non-finite weights (the skipped updates
    # were never applied; the check before publishing is tested in tests/unit/test_checkpoint_publish.py,
    # where weights are corrupted directly), and nothing partial is left.
    run = tmp_path / "stopped"
    proc = _train(tmp_path, run, "--ds_config", "zero2", "--lr", "1e30", "--max_steps", "6", "--max_bad_steps", "2",
                  "--save_every", "1", "--keep_last", "1")
    assert proc.returncode == 3, _out(proc)
    last = proc.stderr.splitlines()[-1]
    assert "2 consecutive optimizer updates were skipped (non-finite loss or gradients), up to step 3" in last, last
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "nonfinite" and status["exit_code"] == 3 and status["step"] == 3
    ckpts = run / "checkpoints"
    latest = (ckpts / "latest").read_text()
    assert [p.name for p in ckpts.glob("step-*")] == [latest]  # nothing partial either
    weights = torch.load(ckpts / latest / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_a_signal_during_evaluation_saves_and_the_evaluation_is_run_again_after_resume(tmp_path):
    # Evaluations at steps 2 and 4 (37 valid + 37 test examples: 5 + 5 generation batches). SIGTERM
    # arrives before batch 3 of step 2's evaluation: the run abandons it, saves step 2, exits 75.
    run = tmp_path / "run"
    args = ["--max_steps", "4", "--eval_every", "2", "--save_every", "0"]
    proc = _train(tmp_path, run, *args, module=FAULTY, COTMI_FAULT_EVAL_SIGNAL="0:2:3:SIGTERM")
    assert proc.returncode == 75, _out(proc)
    assert "stopped by SIGTERM during the evaluation at step 2" in proc.stderr.splitlines()[-1]
    assert (run / "checkpoints" / "latest").read_text() == "step-2"
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"
    assert not (run / "predictions").exists()

    proc = _train(tmp_path, run, *args, "--resume", "auto")
    assert proc.returncode == 0, _out(proc)
    assert proc.stdout.index("step 2: valid accuracy") < proc.stdout.index("step 3/4")  # first of all
    results = json.loads((run / "results.json").read_text())
    assert [e["step"] for e in results["evaluations"]] == [2, 4]
    assert sorted(p.name for p in (run / "predictions").iterdir()) == [
        "step000002-test.jsonl", "step000002-valid.jsonl", "step000004-test.jsonl", "step000004-valid.jsonl"]
