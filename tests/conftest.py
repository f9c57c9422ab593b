"""Shared fixtures: a tiny T5 and tokenizer built on the fly (no hub), and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never reach a model hub, and keep caches inside the test's own temp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Flags that make any training run tiny: a 2-layer T5 with d_model 32 on a few hundred examples.
TINY = ["--scratch_d_model", "32", "--scratch_d_ff", "64", "--scratch_d_kv", "8", "--scratch_num_heads", "2",
        "--scratch_vocab_size", "128", "--synthetic_train_size", "256", "--synthetic_eval_size", "37",
        "--batch_size", "8", "--eval_batch_size", "8", "--max_new_tokens", "12", "--lr", "3e-3",
        "--eval_rationales", "0"]  # a tiny untrained student's rationales run to --max_target_length


@pytest.fixture(scope="module")
def one_thread():
    """For tests of small tensors: extra OpenMP threads only add barriers and contention on shared
    cores. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests run only where torch sees a GPU."""
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in cuda_tests:
            item.add_marker(skip)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's cotmi process: on CPUs, also on a machine with GPUs (no GPU is
    visible to it, and DeepSpeed's accelerator is its CPU one; the deepspeed launcher numbers CPU
    ranks through CUDA_VISIBLE_DEVICES, so DS_ACCELERATOR=cpu is what keeps its ranks on CPUs)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    # `-m tests.faults` (cotmi with injected faults) must be importable from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_cotmi(args: list[str], cwd: Path, timeout: int = 300, launcher: list[str] | None = None,
              module: str = "cotmi_ds", **env: str) -> subprocess.CompletedProcess:
    """`cotmi ARGS` (or LAUNCHER ... -m MODULE ARGS) in a fresh process; output captured. MODULE
    ``tests.faults`` is cotmi with the faults its environment variables describe."""
    cmd = (launcher or [sys.executable]) + ["-m", module] + args
    if launcher and launcher[0].endswith("deepspeed"):
        cmd = launcher + ["--module", module] + args
    return subprocess.run(cmd, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from cotmi_ds.data.synthetic import synthetic_splits
    from cotmi_ds.data.tokenizer import tokenizer_from_sentencepiece, train_sentencepiece

    rows = synthetic_splits(300, 10, seed=0)["train"]
    texts = [p + r["input"] for r in rows for p in ("predict: ", "explain: ")]
    texts += [r["label"] for r in rows] + [r["rationale"] for r in rows]
    return tokenizer_from_sentencepiece(train_sentencepiece(texts, 128))


def tiny_t5_config(vocab_size: int, **overrides):
    from transformers import T5Config

    kw = dict(vocab_size=vocab_size, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
              num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    kw.update(overrides)
    return T5Config(**kw)


def random_batch(vocab, B=4):
    """A two-task batch of random tokens with some padding (collate's keys); the same on every call."""
    import torch

    g = torch.Generator().manual_seed(1)
    batch = {"pred_input_ids": torch.randint(2, vocab, (B, 9), generator=g),
             "pred_attention_mask": torch.ones(B, 9, dtype=torch.long),
             "labels": torch.randint(2, vocab, (B, 4), generator=g),
             "expl_input_ids": torch.randint(2, vocab, (B, 10), generator=g),
             "expl_attention_mask": torch.ones(B, 10, dtype=torch.long),
             "rationale_labels": torch.randint(2, vocab, (B, 7), generator=g)}
    batch["pred_attention_mask"][1, -3:] = 0
    batch["labels"][0, -2:] = -100          # padded targets: ignored by CE, still in the MI max
    batch["rationale_labels"][2, -4:] = -100
    return batch


@pytest.fixture
def tiny_t5(tiny_tokenizer):
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(tiny_t5_config(len(tiny_tokenizer))).eval()


def real_data_root() -> Path | None:
    """The DSS data folder: $COTMI_DATA_ROOT, else <repo>/../shared/data (CI's layout)."""
    for candidate in (os.environ.get("COTMI_DATA_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cqa").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def dss_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("the real DSS data is not here: set COTMI_DATA_ROOT or place it at <repo>/../shared/data")
    return root
