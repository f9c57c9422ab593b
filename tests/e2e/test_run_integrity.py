"""Single-process runs that must never publish bad state or lose work: updates skipped for any
reason are counted and stop the run, a diverged optimizer never becomes `latest`, `--overwrite`
starts clean, a stop request during evaluation still saves. Each run is a tiny ZeRO-0 (or ZeRO-2)
model, ~10 s."""
import json

import torch

from tests.conftest import TINY, run_cotmi

FAULTY = "tests.faults"  # cotmi with the faults that COTMI_FAULT_* describe (tests/faults.py)


def _train(tmp_path, run, *args, module="cotmi_ds", **env):
    return run_cotmi(["train", *TINY, "--ds_config", "zero0", "--eval_every", "0", "--log_every", "1",
                      "--data_cache_dir", str(tmp_path / "cache"), "--output_dir", str(run), *map(str, args)],
                     cwd=tmp_path, timeout=300, module=module, **env)


def _out(proc) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


def test_overwrite_starts_from_an_empty_run_directory(tmp_path):
    # The old run had completed and saved; the new one is killed before its first save. Nothing of
    # the old run may remain: its status.json would make a sweep skip the cell, its checkpoints
    # would make --resume auto continue it under the new settings.
    run = tmp_path / "run"
    (run / "checkpoints" / "step-9").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-9")
    (run / "status.json").write_text('{"status": "completed", "step": 9, "exit_code": 0}')
    (run / "config.yaml").write_text("old: true\n")
    (run / "notes.txt").write_text("the old run's")
    proc = _train(tmp_path, run, "--overwrite", "true", "--max_steps", "3", module=FAULTY,
                  COTMI_FAULT_SIGNAL="0:1:SIGKILL")
    assert proc.returncode == -9, _out(proc)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "ds_config.json", "tb", "tokenizer"]
    assert "old: true" not in (run / "config.yaml").read_text()

    # A non-empty folder that holds no run is never emptied.
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    proc = _train(tmp_path, other, "--overwrite", "true")
    assert proc.returncode == 2 and "holds no run; --overwrite only replaces a run directory" in proc.stderr
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]


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
