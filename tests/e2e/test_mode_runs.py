"""Each mode trains a few steps on the embedded data (one process each) and writes its own loss
parts to TensorBoard, combined with the α and β given. The runs share one tokenized-data cache
(the tokenizer is trained once) and cover ZeRO-0, 1 and 2: each run's exported model reproduces
what the engine predicted in its final evaluation, and `cotmi export` of its last checkpoint gives
the same weights. Two of them train in bf16 (at ZeRO-0, and at ZeRO-2 with gradient accumulation):
their own model/ export and `cotmi export` of their final checkpoint hold the same fp32 master
weights. One has NaN gradients behind a finite loss in one micro-batch: that update is skipped."""
import json
import math
import re
from collections import Counter

import pytest
import torch

from tests.conftest import greedy_outputs, run_cotmi
from tests.tb import read_scalars


SMALL = ["--scratch_d_model", "32", "--scratch_d_ff", "64", "--scratch_d_kv", "8", "--scratch_num_heads", "2",
         "--scratch_vocab_size", "128", "--synthetic_train_size", "64", "--synthetic_eval_size", "8",
         "--batch_size", "8", "--eval_batch_size", "8", "--max_new_tokens", "12", "--max_target_length", "40",
         "--max_steps", "4", "--log_every", "2", "--eval_every", "0", "--eval_rationales", "2"]

PARTS = {
    "standard": {"label_ce"}, "distill": {"label_ce"}, "single": {"single_ce"},
    "dss": {"label_ce", "rationale_ce"}, "mi": {"label_ce", "rationale_ce", "mi"},
}
STAGE = {"standard": "zero0", "distill": "zero0", "single": "zero2", "dss": "zero1", "mi": "zero2"}
BF16 = {"standard": ["--precision", "bf16"], "single": ["--precision", "bf16", "--grad_accum", "2"]}
# distill: ZeRO-0 in fp32 (the bare torch optimizer) with a finite loss but NaN gradients in one
# micro-batch: that update is skipped and reported, and training goes on.
NAN_GRAD = {"distill": 2}


@pytest.mark.parametrize("mode", list(PARTS))
def test_mode_trains_and_logs_its_loss_parts(mode, tmp_path, data_cache_dir):
    run = tmp_path / "run"
    faults = {"module": "tests.faults", "COTMI_FAULT_NAN_GRAD": f"0:{NAN_GRAD[mode]}"} if mode in NAN_GRAD else {}
    proc = run_cotmi(["train", "--mode", mode, "--alpha", "0.3", "--beta", "0.2", "--output_dir", str(run),
                      "--ds_config", STAGE[mode], "--data_cache_dir", str(data_cache_dir)] + SMALL + BF16.get(mode, []),
                     cwd=tmp_path, timeout=600, **faults)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"ZeRO-{STAGE[mode][-1]}, 1 rank(s)" in proc.stdout
    scalars = read_scalars(run / "tb")
    losses = {tag[len("loss/"):] for tag in scalars if tag.startswith("loss/")}
    assert losses == PARTS[mode] | {"total"}
    for step in (0, 1):  # the two logged steps (2 and 4)
        v = {k: scalars[f"loss/{k}"][step][1] for k in losses}
        assert scalars["loss/total"][step][0] == 2 * (step + 1)
        if mode in ("standard", "distill"):
            expected = v["label_ce"]
        elif mode == "single":
            expected = v["single_ce"]
        else:
            expected = 0.3 * v["label_ce"] + 0.7 * v["rationale_ce"] + (0.2 * v["mi"] if mode == "mi" else 0.0)
        assert v["total"] == pytest.approx(expected, rel=1e-5)
    results = json.loads((run / "results.json").read_text())
    assert results["mode"] == mode and results["zero_stage"] == int(STAGE[mode][-1])
    assert results["data"]["label_type"] == ("llm" if mode == "distill" else "gt")
    assert "training labels: " in proc.stdout
    assert "tokenized-data cache: written" in proc.stdout or "tokenized-data cache: hit" in proc.stdout

    assert {"eval/test/ece_equal_mass", "eval/test/first_token_ece_equal_mass"} <= set(scalars)
    # Rationale quality (--eval_rationales 2): modes with a rationale
    # pass score it in TensorBoard, results.json and the final line; the others report none.
    tags = {f"eval/{s}/rationale_{m}" for s in ("valid", "test") for m in ("bleu", "chrf")}
    final = results["evaluations"][-1]["test"]
    done = proc.stdout.strip().splitlines()[-1]
    if "rationale_ce" in PARTS[mode]:
        assert tags <= set(scalars)
        assert final["rationale_examples"] == 2 and 0.0 <= final["rationale_chrf"] <= 100.0
        for m in ("bleu", "chrf"):
            assert results[f"rationale_{m}_last"] == results[f"rationale_{m}_at_best_valid"] == final[f"rationale_{m}"]
            assert scalars[f"eval/test/rationale_{m}"][-1][1] == pytest.approx(final[f"rationale_{m}"], rel=1e-6)
        assert f"rationales BLEU {final['rationale_bleu']:.1f} chrF {final['rationale_chrf']:.1f}" in done
    else:
        assert not tags & set(scalars) and "rationale_chrf_last" not in results and "rationale" not in done
    if mode in NAN_GRAD:
        assert re.search(r"^step \d: non-finite gradients \(on at least one rank\); the update was skipped, "
                         r"1 in a row, 1 in total$", proc.stdout, re.M), proc.stdout[-3000:]
        meta = json.loads((run / "checkpoints" / "step-4" / "cotmi_checkpoint.json").read_text())
        # skipped on the device at ZeRO-0 (optimizer_step.py): counted by the trainer, not DeepSpeed
        assert meta["trainer"]["skipped_updates"] == 1 and results["skipped_updates"] == 1
        assert meta["engine"]["global_steps"] == 4
        assert all(math.isfinite(v[1]) for v in scalars["loss/total"])  # training went on

    if mode in BF16:  # the engine evaluated with bf16 weights; the export holds the fp32 masters
        assert_exports_hold_the_fp32_masters(run, tmp_path)
    else:
        _check_predictions_against_the_export(run, mode, results, scalars)


def _check_predictions_against_the_export(run, mode, results, scalars):
    """The final evaluation, re-derived from the run's exported model with greedy generation written
    apart from the package's: the prediction (in mode single the label read back after the
    rationale), its confidence and, in modes with a rationale pass, the rationale from the explain
    prompt. Then accuracy and the majority baseline from those records and the data."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from cotmi_ds.config import load_config
    from cotmi_ds.data.encode import LABEL_PREFIX, RATIONALE_PREFIX
    from cotmi_ds.data.synthetic import synthetic_splits
    from cotmi_ds.evaluation.scoring import numeric_match
    from cotmi_ds.modes import MODES, SINGLE_SEPARATOR

    cfg = load_config(str(run / "config.yaml"))
    model = T5ForConditionalGeneration.from_pretrained(run / "model")
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    records = [json.loads(line) for line in (run / "predictions" / "step000004-test.jsonl").read_text().splitlines()]
    splits = synthetic_splits(64, 8, seed=0)
    assert [r["input"] for r in records] == [x["input"] for x in splits["test"]]
    assert [r["gold"] for r in records] == [x["label"] for x in splits["test"]]

    cap = max(12, 40) if mode == "single" else 12  # single writes its rationale before the label
    prefix = LABEL_PREFIX if MODES[mode].prefixed else ""  # standard, distill, single: x alone
    expected = greedy_outputs(model, tokenizer, [prefix + r["input"] for r in records], cap,
                              cfg.max_input_length, batch_size=8)
    for r, (text, confidence) in zip(records, expected):
        if mode == "single":  # the label is what follows the last separator, '' without one
            head, sep, label = text.rpartition(SINGLE_SEPARATOR.strip())
            text = label.strip() if sep else ""
        assert r["prediction"] == text, (r, text)
        assert r["confidence"] == pytest.approx(confidence, rel=1e-4, abs=1e-9)
        assert r["correct"] == numeric_match(r["prediction"], r["gold"])
    if MODES[mode].rationale_pass:
        rationales = greedy_outputs(model, tokenizer, [RATIONALE_PREFIX + r["input"] for r in records[:2]], 40,
                                    cfg.max_input_length, batch_size=8)
        assert [r["rationale"] for r in records] == [t for t, _ in rationales] + [None] * 6
    else:
        assert all(r["rationale"] is None for r in records)

    accuracy = sum(r["correct"] for r in records) / len(records)
    assert results["test_accuracy"] == accuracy == dict(scalars["eval/test/accuracy"])[4]
    # Always answering the most common training label, scored by value like the model.
    train_labels = [x["label"] for x in splits["train"]]
    if mode != "distill":  # (distill trains on the teacher's labels)
        top = Counter(train_labels).most_common(1)[0][0]
        assert results["majority_label_test_accuracy"] == pytest.approx(
            sum(numeric_match(top, r["gold"]) for r in records) / len(records))

    # `cotmi export` of the last checkpoint: the same weights as the engine's own export.
    from safetensors.torch import load_file

    from cotmi_ds.checkpoint.export import export_checkpoint

    export_checkpoint(str(run), str(run / "exported"))
    exported, own = load_file(run / "exported" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert exported.keys() == own.keys() and all((exported[k] == own[k]).all() for k in own)


def assert_exports_hold_the_fp32_masters(run, tmp_path):
    from safetensors.torch import load_file

    from cotmi_ds.checkpoint.export import export_checkpoint

    export_checkpoint(str(run), str(tmp_path / "hf"))  # `cotmi export RUN`, in this process
    own, exported = load_file(run / "model" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert own.keys() == exported.keys() and all(torch.equal(own[k], exported[k]) for k in own)
    assert {v.dtype for v in own.values()} == {torch.float32}
    # Training moved the masters off bf16's grid; the bf16 weights the forward used are their rounding.
    assert all((v.to(torch.bfloat16).float() != v).any() for v in own.values())
    for folder in (run / "model", tmp_path / "hf"):
        config = json.loads((folder / "config.json").read_text())
        assert config["dtype"] == "float32"
        assert config["cotmi_export"]["weights"] == "fp32 master weights of a bf16 run"
        assert config["cotmi_export"]["step"] == 4
    states = run / "checkpoints" / "step-4" / "mp_rank_00_model_states.pt"
    module = torch.load(states, map_location="cpu", weights_only=True)["module"]
    assert module["t5.shared.weight"].dtype == torch.bfloat16
    assert torch.equal(own["shared.weight"].to(torch.bfloat16), module["t5.shared.weight"])
