"""`cotmi teach --backend transformers`: the teacher loaded in this process (a tiny causal LM built
here), batched; the job, cache and manifest are the same as with a server. Its output then trains a
student as `cotmi train --dataset OUT`, as a user goes from the teacher to the student."""
from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, run_cotmi
from tests.teach_servers import build_tiny_causal_lm



def test_in_process_teacher(tmp_path):
    model = build_tiny_causal_lm(tmp_path / "lm")
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 20), ("test", 3)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"input": f"Is {i} even ({split})?", "label": "yes"}) + "\n"
                                                     for i in range(n)))
    args = ["teach", "--dataset", data, "--task", "exact", "--out", tmp_path / "out", "--backend", "transformers",
            "--model", model, "--batch_size", 4, "--max_tokens", 6, "--filter", "keep_all"]
    done = run_cotmi(args, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["teacher"] == {"backend": "transformers", "model": str(model), "endpoints": [], "api": "chat"}
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 20, "test": 3}
    cache = [json.loads(line) for line in (tmp_path / "out" / "cache.jsonl").read_text().splitlines()]
    assert len(cache) == 23 and all(0 < r["completion_tokens"] <= 6 for r in cache)
    again = run_cotmi(args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "23 already answered" in again.stdout

    # The published folder is a dataset `cotmi train` reads as it is: the teacher's rationales train
    # the student (mode mi), valid is drawn from train, and the test split is evaluated.
    run = tmp_path / "run"
    trained = run_cotmi(["train", "--dataset", tmp_path / "out", "--output_dir", run, *TINY, "--max_steps", 2,
                         "--eval_every", 2, "--max_target_length", 16], cwd=tmp_path, timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert f"from {tmp_path / 'out'}: train 18, valid 2, test 3 rows; task exact" in trained.stdout
    results = json.loads((run / "results.json").read_text())
    assert (results["dataset"], results["task"]) == (str(tmp_path / "out"), "exact")
    assert results["evaluations"][-1]["test"]["total"] == 3
