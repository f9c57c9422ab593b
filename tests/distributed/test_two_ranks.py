"""2 CPU ranks through torchrun at ZeRO-3, with what the resilience chains do not exercise: a
global batch of 16 taken as 2 ranks x 2 accumulation steps x 4 examples on 258 rows (every epoch
ends in a batch of 2 rows, one per rank in the first micro-step; in the second both ranks run a
stand-in row of weight 0), and evaluation capped to the first 25 examples during training and run
on all 37 (an uneven split over 2 ranks) at the end. Checks the counts, predictions files,
calibration scalars, results.json and the export. (The deepspeed launcher at ZeRO-2 is checked by
the last launch of tests/distributed/test_resilience.py's ZeRO-2 chain.)"""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from cotmi_ds.distributed import reserved_port
from tests.conftest import TINY, run_cotmi
from tests.tb import read_scalars

pytestmark = pytest.mark.dist

EXPECTED_TAGS = {
    "loss/total", "loss/label_ce", "loss/rationale_ce", "loss/mi", "optim/lr", "optim/grad_norm",
    "throughput/samples_per_s", "throughput/tokens_per_s", "eval/valid/accuracy", "eval/test/accuracy",
    "memory/rss_gib", "optim/skipped_steps", "throughput/tflops_per_device", "time/step_ms",
    "time/data_wait_ms", "time/forward_ms", "time/backward_ms", "time/optimizer_ms", "time/eval_s",
} | {f"eval/{s}/{m}" for s in ("valid", "test") for m in ("ece_equal_mass", "ece_equal_width", "avg_confidence")}
RATIONALES = 3  # synced generation of a second kind, capped at 16 tokens to keep the launch short
CAP = 25  # examples evaluated during training (--eval_max_examples); all 37 at the end


def test_two_rank_zero3_with_accumulation_partial_batches_and_capped_evaluation(tmp_path):
    out = tmp_path / "run"
    with reserved_port() as port:
        launcher = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                    "--master_port", str(port)]
        proc = run_cotmi(["train", *TINY, "--ds_config", "zero3", "--max_steps", "40", "--log_every", "5",
                          "--eval_every", "20", "--output_dir", str(out), "--global_batch_size", "16",
                          "--batch_size", "4", "--synthetic_train_size", "258",
                          "--eval_rationales", str(RATIONALES), "--max_target_length", "16",
                          "--eval_max_examples", str(CAP)],
                         cwd=tmp_path, timeout=400, launcher=launcher)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ZeRO-3, 2 rank(s)" in proc.stdout
    assert ("batch: 16 examples per optimizer step (--global_batch_size 16) = "
            "micro-batch 4 x 2 accumulation step(s) x 2 rank(s)") in proc.stdout

    scalars = read_scalars(out / "tb")
    assert EXPECTED_TAGS <= set(scalars), sorted(scalars)
    losses = [v for _, v in scalars["loss/total"]]
    assert [s for s, _ in scalars["loss/total"]] == list(range(5, 41, 5))
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(v > 0 for _, v in scalars["throughput/tokens_per_s"])

    # Evaluation shards 37 examples over 2 ranks: every example counted exactly once.
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["zero_stage"] == 3
    assert (results["global_batch_size"], results["micro_batch_size"], results["grad_accum"]) == (16, 4, 2)
    assert [e["step"] for e in results["evaluations"]] == [20, 40]
    assert [(e["valid"]["total"], e["test"]["total"]) for e in results["evaluations"]] == [(CAP,) * 2,
                                                                                          (37, 37)]
    line = re.search(r"^step 20: valid accuracy [\d.]+ \(\d+/\d+\) in [\d.]+ s; (.*)$", proc.stdout, re.M)
    assert line and "ece_equal_mass" in line.group(1), proc.stdout[-3000:]  # timed, with its metrics
    assert results["label_type"] == "gt" and results["subsample"] == 1.0
    assert results["accuracy_last"] == results["evaluations"][-1]["test"]["accuracy"]
    assert results["accuracy_best_test"] == max(e["test"]["accuracy"] for e in results["evaluations"])
    assert {results["step_last"], results["step_best_test"], results["step_at_best_valid"]} <= {20, 40}

    # The predictions written beside them: one line per example, in the split's order, agreeing
    # with the counts, the calibration figures and the TensorBoard scalars.
    from cotmi_ds.data.synthetic import synthetic_splits

    splits = synthetic_splits(256, 37, seed=0)
    for e in results["evaluations"]:
        for split in ("valid", "test"):
            rows = [json.loads(line) for line in
                    (out / "predictions" / f"step{e['step']:06d}-{split}.jsonl").read_text().splitlines()]
            n = e[split]["total"]
            assert [r["index"] for r in rows] == list(range(n))
            assert [r["input"] for r in rows] == [x["input"] for x in splits[split]][:n]
            assert sum(r["correct"] for r in rows) == e[split]["correct"]
            assert sum(r["confidence"] for r in rows) / n == pytest.approx(e[split]["avg_confidence"])
            n_rat = RATIONALES
            assert [r["rationale"] is not None for r in rows] == [i < n_rat for i in range(n)]
            assert (dict(scalars[f"eval/{split}/accuracy"])[e["step"]]
                    == pytest.approx(e[split]["accuracy"]))
            assert (dict(scalars[f"eval/{split}/ece_equal_mass"])[e["step"]]
                    == pytest.approx(e[split]["ece_equal_mass"], abs=1e-6))

    # The exported student (consolidated from ZeRO-3 shards) loads with from_pretrained.
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.num_parameters() > 10_000 and len(tok) <= model.config.vocab_size
    assert not any(p.abs().sum() == 0 for p in model.parameters())  # no empty ZeRO-3 placeholders
    shutil.rmtree(out)
