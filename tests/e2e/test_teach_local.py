"""`cotmi teach --backend transformers`: the teacher loaded in this process (a tiny causal LM built
here), batched; the job, cache and manifest are the same as with a server."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cotmi
from tests.teach_servers import build_tiny_causal_lm



def test_in_process_teacher(tmp_path):
    model = build_tiny_causal_lm(tmp_path / "lm")
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"input": f"Is {i} even ({split})?", "label": "yes"}) + "\n"
                                                     for i in range(n)))
    args = ["teach", "--dataset", data, "--task", "exact", "--out", tmp_path / "out", "--backend", "transformers",
            "--model", model, "--batch_size", 4, "--max_tokens", 6, "--filter", "keep_all"]
    done = run_cotmi(args, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["teacher"] == {"backend": "transformers", "model": str(model), "endpoints": [], "api": "chat"}
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 5, "test": 3}
    cache = [json.loads(line) for line in (tmp_path / "out" / "cache.jsonl").read_text().splitlines()]
    assert len(cache) == 8 and all(0 < r["completion_tokens"] <= 6 for r in cache)
    again = run_cotmi(args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "8 already answered" in again.stdout
