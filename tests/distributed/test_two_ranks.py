"""2 CPU ranks through the real launchers: the deepspeed launcher at ZeRO-2, torchrun at ZeRO-3.
Both evaluate 37 examples (an uneven split over 2 ranks) and check the counts, predictions files,
calibration scalars and results.json; ZeRO-3 trains through epochs that end in a partial batch."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from cotmi_ds.distributed import free_port
from tests.conftest import TINY, run_cotmi
from tests.tb import read_scalars

pytestmark = pytest.mark.dist

EXPECTED_TAGS = {
    "loss/total", "loss/label_ce", "loss/rationale_ce", "loss/mi", "optim/lr", "optim/grad_norm",
    "throughput/samples_per_s", "throughput/tokens_per_s", "eval/valid/accuracy", "eval/test/accuracy",
    "memory/rss_gib", "optim/skipped_steps", "throughput/tflops_per_device", "time/step_ms",
    "time/data_wait_ms", "time/forward_ms", "time/backward_ms", "time/optimizer_ms", "time/eval_s",
} | {f"eval/{s}/{m}" for s in ("valid", "test") for m in ("ece_equal_mass", "ece_equal_width", "avg_confidence")}
# ZeRO-3 also generates rationales (synced generation of a second kind), capped at 16 tokens by
# --max_target_length to keep the launch short.
RATIONALES = {"zero2": 0, "zero3": 3}
# ZeRO-3 also takes a global batch of 16 as 2 ranks x 2 accumulation steps x 4 examples, on 258 rows:
# each epoch ends in a batch of 2 rows, one per rank in the first micro-step; in the second both ranks
# run a stand-in row of weight 0 (later flags win).
GLOBAL_BATCH = {"zero2": [], "zero3": ["--global_batch_size", "16", "--batch_size", "4",
                                       "--synthetic_train_size", "258"]}
# ZeRO-3 evaluates only the first 25 examples during training (--eval_max_examples), all at the end.
CAP = {"zero2": 37, "zero3": 25}


def _launch(kind: str, stage: str, out: Path, tmp: Path):
    port = str(free_port())
    bin_dir = Path(sys.executable).parent
    if kind == "deepspeed":
        launcher = [str(bin_dir / "deepspeed"), "--num_accelerators", "2", "--master_port", port]
    else:
        launcher = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    args = ["train", *TINY, "--ds_config", stage, "--max_steps", "40", "--log_every", "5",
            "--eval_every", "20", "--output_dir", str(out), *GLOBAL_BATCH[stage]]
    if RATIONALES[stage]:
        args += ["--eval_rationales", str(RATIONALES[stage]), "--max_target_length", "16"]
    if CAP[stage] < 37:
        args += ["--eval_max_examples", str(CAP[stage])]
    return run_cotmi(args, cwd=tmp, timeout=400, launcher=launcher)


@pytest.mark.parametrize("kind, stage", [("deepspeed", "zero2"), ("torchrun", "zero3")])
def test_two_rank_training_learns_logs_and_exports(kind, stage, tmp_path):
    out = tmp_path / "run"
    proc = _launch(kind, stage, out, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"ZeRO-{stage[-1]}, 2 rank(s)" in proc.stdout
    micro, accum = (4, 2) if GLOBAL_BATCH[stage] else (8, 1)
    assert (f"batch: 16 examples per optimizer step{' (--global_batch_size 16)' if accum > 1 else ''} = "
            f"micro-batch {micro} x {accum} accumulation step(s) x 2 rank(s)") in proc.stdout

    scalars = read_scalars(out / "tb")
    assert EXPECTED_TAGS <= set(scalars), sorted(scalars)
    losses = [v for _, v in scalars["loss/total"]]
    assert [s for s, _ in scalars["loss/total"]] == list(range(5, 41, 5))
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(v > 0 for _, v in scalars["throughput/tokens_per_s"])

    # Evaluation shards 37 examples over 2 ranks: every example counted exactly once.
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["zero_stage"] == int(stage[-1])
    assert (results["global_batch_size"], results["micro_batch_size"], results["grad_accum"]) == (16, micro, accum)
    assert [e["step"] for e in results["evaluations"]] == [20, 40]
    assert [(e["valid"]["total"], e["test"]["total"]) for e in results["evaluations"]] == [(CAP[stage],) * 2,
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
            n_rat = RATIONALES[stage]
            assert [r["rationale"] is not None for r in rows] == [i < n_rat for i in range(n)]
            assert (dict(scalars[f"eval/{split}/accuracy"])[e["step"]]
                    == pytest.approx(e[split]["accuracy"]))
            assert (dict(scalars[f"eval/{split}/ece_equal_mass"])[e["step"]]
                    == pytest.approx(e[split]["ece_equal_mass"], abs=1e-6))

    # The exported student (ZeRO-3: consolidated from shards) loads with from_pretrained.
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.num_parameters() > 10_000 and len(tok) <= model.config.vocab_size
    assert not any(p.abs().sum() == 0 for p in model.parameters())  # no empty ZeRO-3 placeholders
    shutil.rmtree(out)
