"""`cotmi eval` of a Hugging Face model folder and of a run directory: the model's own greedy outputs,
its rationales, and a run's results left alone."""
import json
import shutil

import pytest
import torch

from cotmi_ds.config import load_config
from cotmi_ds.data.synthetic import synthetic_splits
from tests.conftest import run_cotmi

DATA = ["--synthetic_train_size", "40", "--synthetic_eval_size", "7"]
EVAL = ["--max_new_tokens", "6", "--eval_batch_size", "4", "--eval_rationales", "2", "--max_target_length", "8"]


def test_eval_of_a_model_folder_and_of_a_run_directory(varied_t5, tiny_tokenizer, tmp_path):
    threads = torch.get_num_threads()  # the in-process generations below: tiny matrices, a shared machine
    torch.set_num_threads(1)
    try:
        _check_eval(varied_t5, tiny_tokenizer, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_eval(tiny_t5, tiny_tokenizer, tmp_path):
    folder = tmp_path / "hf"
    tiny_t5.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    before = [p.name for p in folder.iterdir()]

    proc = run_cotmi(["eval", "--checkpoint", str(folder), *DATA, *EVAL], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "hf-eval"                   # default for a model folder: beside it, which stays as it was
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["checkpoint_kind"] == "hf" and results["dataset"] == "synthetic"
    assert results["test"]["total"] == 7 and results["valid"]["total"] == 7
    assert f"test: accuracy {results['test']['accuracy']:.4f}" in proc.stdout

    # The predictions are the model's own greedy outputs on the test split, in order.
    records = _read_jsonl(out / "predictions" / "eval-test.jsonl")
    test_rows = synthetic_splits(40, 7, seed=0)["test"]
    assert [r["input"] for r in records] == [r["input"] for r in test_rows]
    # Rationales for the first two (--eval_rationales 2): greedy from the explain prompt, at most
    # --max_target_length 8 tokens.
    for r, row in zip(records, test_rows):
        ids = tiny_tokenizer("explain: " + row["input"], return_tensors="pt").input_ids
        with torch.no_grad():
            gen = tiny_t5.generate(input_ids=ids, do_sample=False, num_beams=1, max_new_tokens=8)
        text = tiny_tokenizer.decode(gen[0], skip_special_tokens=True).strip()
        assert r["rationale"] == (text if r["index"] < 2 else None)
    for r, row in zip(records, test_rows):
        ids = tiny_tokenizer("predict: " + row["input"], return_tensors="pt").input_ids
        with torch.no_grad():
            gen = tiny_t5.generate(input_ids=ids, do_sample=False, num_beams=1, max_new_tokens=6)
        assert r["prediction"] == tiny_tokenizer.decode(gen[0], skip_special_tokens=True).strip()
        assert set(r) == {"index", "input", "gold", "prediction", "correct", "confidence",
                          "first_token_confidence", "rationale"}
        assert 0.0 < r["confidence"] <= 1.0
    assert results["test"]["avg_confidence"] == pytest.approx(sum(r["confidence"] for r in records) / 7)
    # the two rationales scored against the teacher's, printed and written
    assert results["test"]["rationale_examples"] == 2 and 0.0 <= results["test"]["rationale_chrf"] <= 100.0
    assert f"rationale_chrf {results['test']['rationale_chrf']:.2f} (2 rationales)" in proc.stdout

    # A run directory: its config.yaml gives the data; its results.json is left alone.
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(synthetic_train_size=40, synthetic_eval_size=7, max_new_tokens=6, eval_batch_size=4,
                      eval_rationales=2, max_target_length=8, output_dir=str(run))
    (run / "config.yaml").write_text(cfg.to_yaml())
    shutil.copytree(folder, run / "model")
    (run / "results.json").write_text('{"from": "training"}')
    proc = run_cotmi(["eval", "--checkpoint", str(run), "--output_dir", str(tmp_path / "ev")], cwd=tmp_path,
                     timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    again = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert again["checkpoint_kind"] == "run" and again["model"] == "scratch"
    def timeless(m):  # the generation times differ from run to run
        return {k: v for k, v in m.items() if not k.endswith("_generation_s")}

    for split in ("valid", "test"):
        assert timeless(again[split]) == timeless(results[split])
    assert (run / "results.json").read_text() == '{"from": "training"}'
    assert not (run / "eval_results.json").exists()

    # Flags that would change a run's data are refused, naming the way to do it instead.
    proc = run_cotmi(["eval", "--checkpoint", str(run), "--dataset", "svamp"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and f"pass --checkpoint {run / 'model'}" in proc.stderr


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]
