"""config -> rows of the splits -> tokenizer -> encoded splits, through the on-disk cache.

A run whose cache entry exists neither parses the data files (it only hashes their bytes) nor
tokenizes anything: it memory-maps the Arrow files. Rank 0 builds what is missing; the other ranks
wait and then read the entry (or, on a node that cannot see rank 0's disk, build it in memory).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from cotmi_ds.config import TrainConfig
from cotmi_ds.distributed import DistEnv, barrier, broadcast_bytes, broadcast_str
from cotmi_ds.errors import UsageError
from cotmi_ds.modes import SINGLE_SEPARATOR, label_type_of, mode_of
from cotmi_ds.data.datasets import DSS_DATASETS, T5_EOS, check_data_files, input_files, resolve_data_root
from cotmi_ds.data.cache import DataCache, code_fingerprint, default_cache_dir, digest, files_fingerprint
from cotmi_ds.data.encode import LABEL_PREFIX, RATIONALE_PREFIX, encode_split
from cotmi_ds.data.own import locate
from cotmi_ds.data.splits import DataSummary, Splits, build_splits
from cotmi_ds.data.tokenizer import given_tokenizer, load_tokenizer, tokenizer_from_sentencepiece, train_sentencepiece


@dataclass
class Data:
    tokenizer: PreTrainedTokenizerBase
    splits: dict[str, Dataset]  # "train", "valid", "test": text columns + token ids
    summary: DataSummary | None = None
    cache_status: str = "off"   # "off", "hit", "written" (by this rank) or "read" (written by rank 0)
    seconds: float = 0.0        # time to prepare the data (tokenizer included)


def rows_key(cfg: TrainConfig, eos: str) -> str:
    """Everything that changes the rows of the splits."""
    parts = {"dataset": cfg.dataset, "label_type": label_type_of(cfg), "subsample": cfg.subsample,
             "eos": eos, "code": code_fingerprint()}
    if cfg.dataset == "synthetic":
        parts.update(seed=cfg.seed, sizes=[cfg.synthetic_train_size, cfg.synthetic_eval_size])
    else:
        if cfg.dataset in DSS_DATASETS:
            files = input_files(DSS_DATASETS[cfg.dataset], resolve_data_root(cfg.data_root, cfg.dataset))
        else:  # your own data: its files and manifest; the task its labels were checked against
            files, parts["task"] = locate(cfg.dataset).input_files(), cfg.task
        parts["files"] = files_fingerprint(files)
        if cfg.subsample < 1.0:  # the seed only draws the subsample; valid (and test) always seed 0
            parts["seed"] = cfg.seed
    return digest(parts)


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase, spm_model: bytes | None) -> str:
    """The bytes that define the tokenizer: the sentencepiece model trained on the fly; else the
    backend's complete definition (vocabulary, normalizer, pre-tokenizer, special tokens, post-
    processor), minus the truncation/padding state its last call left behind, and the truncation
    side; for a tokenizer without a backend, the files ``save_pretrained`` writes."""
    h = hashlib.sha256()
    if spm_model is not None:
        h.update(b"spm\0" + spm_model)
        return h.hexdigest()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec["truncation"] = spec["padding"] = None
        h.update(json.dumps({"class": type(tokenizer).__name__, "truncation_side": tokenizer.truncation_side,
                             "backend": spec}, sort_keys=True).encode())
        return h.hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(tmp)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def tokenizer_texts(train: Dataset) -> list[str]:
    """What a tokenizer trained on the fly learns from: the same for every mode, so that modes
    compared on one dataset share one vocabulary."""
    texts = [p + x for x in train["input"] for p in (LABEL_PREFIX, RATIONALE_PREFIX)]
    return texts + list(train["label"]) + [r for r in train["rationale"] if r is not None]


def _on_main(fn, env: DistEnv):
    """``fn()`` on rank 0; a UsageError there is raised on every rank (none waits forever)."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except UsageError as e:
            error = str(e)
    status = broadcast_str(("E" + error) if error is not None else "K", env, after_solo_work=True)
    if status.startswith("E"):
        raise UsageError(status[1:])
    return result


@contextmanager
def _writing(cache: DataCache):
    try:
        yield
    except PermissionError as e:
        raise UsageError(f"--data_cache_dir {cache.root}: cannot write there ({e.strerror}); pass another "
                         "folder, or --data_cache false") from None


def prepare_data(cfg: TrainConfig, env: DistEnv) -> Data:
    t0 = time.perf_counter()
    mode = mode_of(cfg)
    cfg = check_data_files(cfg)
    given = given_tokenizer(cfg)
    tokenizer = load_tokenizer(*given) if given else None
    eos = tokenizer.eos_token if tokenizer is not None else T5_EOS
    cache = DataCache(cfg.data_cache_dir or default_cache_dir()) if cfg.data_cache else None
    key = rows_key(cfg, eos)
    memo: dict[str, Splits] = {}

    def rows() -> Splits:
        if "v" not in memo:
            memo["v"] = build_splits(cfg, eos)
        return memo["v"]

    spm_model = None
    if tokenizer is None:
        # Trained once on rank 0 and broadcast, so every rank holds the identical vocabulary.
        spm_key = digest({"rows": key, "vocab": cfg.scratch_vocab_size})

        def spm() -> bytes:
            model = cache.load_tokenizer_model(spm_key) if cache else None
            if model is None:
                model = train_sentencepiece(tokenizer_texts(rows().rows["train"]), cfg.scratch_vocab_size)
                if cache:
                    with _writing(cache):
                        cache.save_tokenizer_model(spm_key, model)
            return model

        spm_model = broadcast_bytes(_on_main(spm, env), env)
        tokenizer = tokenizer_from_sentencepiece(spm_model)
        assert tokenizer.eos_token == T5_EOS, tokenizer.eos_token

    lengths = [cfg.max_input_length, cfg.max_target_length]

    def encode_all(folder=None) -> tuple[dict[str, Dataset], dict]:
        built = rows()
        splits = {name: encode_split(ds, tokenizer, *lengths, mode=mode,
                                     cache_file=str(folder / f"{name}.arrow") if folder else None)
                  for name, ds in built.rows.items()}
        return splits, {"splits": list(splits), "summary": built.summary.to_dict()}

    status = "off"
    if cache is not None:
        enc_key = digest({"rows": key, "tokenizer": tokenizer_identity(tokenizer, spm_model), "lengths": lengths,
                          "prefixes": [LABEL_PREFIX, RATIONALE_PREFIX] if mode.prefixed else [],
                          "separator": SINGLE_SEPARATOR if mode.single_target else None,
                          "encoding": mode.encoding})

        def fill_cache() -> str:
            if cache.has_splits(enc_key):
                return "hit"
            rows()  # a bad file raises here, before anything is written to the cache
            with _writing(cache):
                cache.write_splits(enc_key, lambda folder: encode_all(folder)[1])
            return "written"

        built = _on_main(fill_cache, env)
        barrier(env)
        loaded = cache.load_splits(enc_key)
        if loaded is not None:
            status = built or "read"  # "read": another rank built it
            splits, meta = loaded
    if status == "off":
        splits, meta = encode_all()
    summary = DataSummary.from_dict(meta["summary"])
    return Data(tokenizer=tokenizer, splits=splits, summary=summary, cache_status=status,
                seconds=time.perf_counter() - t0)
