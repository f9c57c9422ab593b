"""Shared fixtures: a tiny T5 and tokenizer built on the fly (no hub), and a CLI runner."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never reach a model hub, and keep caches inside the test's own temp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Parallel workers (`make test`) already keep the cores busy: more OpenMP threads in each would add
# barriers and contention, not speed. Set before torch is imported; every process a test starts
# gets one thread too (child_env).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

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


@pytest.fixture(autouse=True)
def ieee_subnormals():
    """A run started inside the test process (init_distributed) flushes subnormals on its thread; the
    next test gets IEEE arithmetic back (hypothesis draws subnormals, and refuses a CPU that flushes)."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank CPU process group for the module (the environment restored afterwards)."""
    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    from cotmi_ds.distributed import init_distributed, shutdown

    yield init_distributed(60)
    shutdown()
    os.environ.clear()
    os.environ.update(saved)


# The longest modules, started first: with parallel workers (`make test` runs pytest -n 3) the
# others fill the time beside them instead of leaving one of them running alone at the end.
LONGEST_FIRST = ("tests/e2e/test_demo.py", "tests/distributed/test_resilience.py", "tests/slurm/test_slurm.py",
                 "tests/e2e/test_gpu_check.py")


# A test's tier is its folder: every test in these folders gets the folder's marker (pyproject.toml
# describes the markers), so `-m "not slow"` and the rest select by folder.
FOLDER_MARKERS = {"e2e": "slow", "distributed": "dist", "slurm": "slurm"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Markers from folders; the longest modules first; ``@pytest.mark.cuda`` tests run only where
    torch sees a GPU."""
    folders = {marker: folder for folder, marker in FOLDER_MARKERS.items()}
    for item in items:
        marker = FOLDER_MARKERS.get(Path(str(item.fspath)).parent.name)
        if marker:
            item.add_marker(marker)
        else:
            misplaced = [m.name for m in item.iter_markers() if m.name in folders]
            if misplaced:
                raise pytest.UsageError(f"{item.nodeid} is marked {misplaced[0]}: move it to "
                                        f"tests/{folders[misplaced[0]]}/ (the folder gives the marker)")

    def rank(item):
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a module, the written order
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in cuda_tests:
            item.add_marker(skip)


def child_env(**extra: str | None) -> dict[str, str]:
    """The environment of a test's cotmi process: on CPUs, also on a machine with GPUs (no GPU is
    visible to it, and DeepSpeed's accelerator is its CPU one; the deepspeed launcher numbers CPU
    ranks through CUDA_VISIBLE_DEVICES, so DS_ACCELERATOR=cpu is what keeps its ranks on CPUs).
    ``extra``: variables to set, or to remove (None)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    # `-m tests.faults` (cotmi with injected faults) must be importable from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update({k: v for k, v in extra.items() if v is not None})
    for key in (k for k, v in extra.items() if v is None):
        env.pop(key, None)
    return env


# Lines libraries print on their own: DeepSpeed's logger, Python warnings, tqdm bars.
LIBRARY_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[[A-Z]+\]|\b[A-Z]\w*Warning: |\d+(it| examples)/s\]")


def library_lines(output: str) -> list[str]:
    """The lines of a command's output that a library printed, not the product."""
    return [line for line in output.splitlines() if LIBRARY_LINE.search(line)]


def run_cotmi(args: list[str], cwd: Path, timeout: int = 300, launcher: list[str] | None = None,
              module: str = "cotmi_ds", **env: str | None) -> subprocess.CompletedProcess:
    """`cotmi ARGS` (or LAUNCHER ... -m MODULE ARGS) in a fresh process; output captured. MODULE
    ``tests.faults`` is cotmi with the faults its environment variables describe."""
    cmd = (launcher or [sys.executable]) + ["-m", module] + args
    if launcher and launcher[0].endswith("deepspeed"):
        cmd = launcher + ["--module", module] + args
    return run_in_own_session([str(c) for c in cmd], cwd=cwd, env=child_env(**env), timeout=timeout)


def run_in_own_session(cmd: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` with the child in its own session:
    on a timeout the whole group (a launcher and the ranks it started) is killed, so no rank is
    left behind to slow the tests that follow."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    except BaseException:  # KeyboardInterrupt, a failing test's teardown: never leave the group
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of ``proc`` (started with start_new_session=True), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="session")
def without_torch(tmp_path_factory) -> dict[str, str]:
    """The environment of a process in which importing torch fails (``run_cotmi(..., **without_torch)``):
    errors in flags and data files must come first."""
    blocker = tmp_path_factory.mktemp("no-torch")
    (blocker / "torch").mkdir()
    (blocker / "torch" / "__init__.py").write_text('raise ImportError("torch imported before the flags were checked")\n')
    return {"PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}


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


@pytest.fixture
def varied_t5(tiny_tokenizer):
    """A tiny T5 whose greedy outputs differ from input to input and prompt to prompt (5x the usual
    initial weights; at 1x every output is empty): for tests that tell outputs apart."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(tiny_t5_config(len(tiny_tokenizer), initializer_factor=5.0)).eval()


def real_data_root() -> Path | None:
    """The DSS data folder: $COTMI_DATA_ROOT, else <repo>/../shared/data (CI's layout)."""
    for candidate in (os.environ.get("COTMI_DATA_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cqa").is_dir():
            return Path(candidate)
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def dss_root() -> Path:
    """The real DSS data; skipped where it is absent, but in CI (CI=true) its absence is a failure:
    a CI machine without the data would otherwise pass by testing nothing."""
    root = real_data_root()
    if root is None:
        reason = "the real DSS data is not here: set COTMI_DATA_ROOT or place it at <repo>/../shared/data"
        if in_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    return root


def _register_hypothesis_profiles() -> None:
    """CI (CI=true) runs the same hypothesis cases every time (derandomized, no example database):
    a red CI run is then reproducible, and a green one is not luck. Locally, cases stay random."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    if in_ci():
        settings.load_profile("ci")


_register_hypothesis_profiles()


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory) -> Path:
    """One tokenized-data cache for the session's single-process runs: a sentencepiece model
    trained for one run is reused by the next (the cache keys on everything that changes it)."""
    return tmp_path_factory.mktemp("data-cache")


def reference_batches(cfg, t5_config, world_size: int = 1, order_state: dict | None = None):
    """The training micro-batches of every rank of WORLD_SIZE in a run with config CFG, rebuilt in
    this process (same tokenizer, same ``BatchSource``), optionally from a checkpoint's data position
    (``cotmi_checkpoint.json``: trainer.order): what a reference computation must feed the model.
    Returns (the prepared data, one batch source per rank)."""
    import torch

    from cotmi_ds.data.batches import BatchSource
    from cotmi_ds.data.pipeline import prepare_data
    from cotmi_ds.data.sampler import BatchOrder
    from cotmi_ds.distributed import DistEnv
    from cotmi_ds.modes import mode_of

    cpu = torch.device("cpu")
    data = prepare_data(cfg, DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=cpu))
    sources = []
    for rank in range(world_size):
        order = BatchOrder(len(data.splits["train"]), cfg.batch_size, rank, world_size, cfg.seed, cfg.grad_accum)
        if order_state is not None:
            order.load_state_dict(order_state)
        sources.append(BatchSource(data.splits["train"], order, data.tokenizer.pad_token_id, mode_of(cfg),
                                   t5_config, cpu))
    return data, sources


def greedy_outputs(model, tokenizer, prompts: list[str], max_new_tokens: int, max_input_length: int = 512,
                   batch_size: int = 1) -> list[tuple[str, float]]:
    """Written apart from the package's generate.py, as the reference for what a run predicted:
    greedy generation in batches of BATCH_SIZE prompts (right-padded, as a run pads; a barely trained
    model has near-ties that padding noise can flip, so match the run's batches), decoded without
    special tokens and stripped, with each output's confidence (the product of the probabilities of
    its tokens up to the first EOS) from a teacher-forced forward pass of the prompt alone."""
    import torch

    out = []
    model.eval()
    eos = model.config.eos_token_id
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, truncation=True, max_length=max_input_length, padding=True, return_tensors="pt")
            seqs = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                  num_beams=1, max_new_tokens=max_new_tokens)
            for prompt, seq in zip(chunk, seqs):
                target = seq[1:]
                if (target == eos).any():
                    target = target[: int((target == eos).nonzero()[0]) + 1]
                ids = tokenizer(prompt, truncation=True, max_length=max_input_length, return_tensors="pt").input_ids
                logits = model(input_ids=ids, decoder_input_ids=seq[None, :len(target)]).logits[0]
                logp = logits.double().log_softmax(-1).gather(1, target[:, None]).sum()
                out.append((tokenizer.decode(seq, skip_special_tokens=True).strip(), float(logp.exp())))
    return out
