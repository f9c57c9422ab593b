"""config -> raw splits -> tokenizer -> encoded splits."""
from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import TrainConfig
from ..distributed import DistEnv, broadcast_bytes
from .encode import LABEL_PREFIX, RATIONALE_PREFIX, encode_split
from .synthetic import synthetic_splits
from .tokenizer import load_tokenizer, tokenizer_from_sentencepiece, train_sentencepiece


@dataclass
class Data:
    tokenizer: PreTrainedTokenizerBase
    splits: dict[str, Dataset]  # "train", "valid", "test": text columns + token ids


def load_rows(cfg: TrainConfig) -> dict[str, list[dict[str, str]]]:
    if cfg.dataset == "synthetic":
        return synthetic_splits(cfg.synthetic_train_size, cfg.synthetic_eval_size, cfg.seed)
    raise AssertionError(f"dataset {cfg.dataset!r} passed validation but has no loader")


def resolve_tokenizer(cfg: TrainConfig, train_rows: list[dict[str, str]], env: DistEnv) -> PreTrainedTokenizerBase:
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    if cfg.model != "scratch":
        return load_tokenizer(cfg.model)
    # Trained once on rank 0 and broadcast, so every rank holds the identical vocabulary.
    model_bytes = None
    if env.is_main:
        texts = [p + r["input"] for r in train_rows for p in (LABEL_PREFIX, RATIONALE_PREFIX)]
        texts += [r["label"] for r in train_rows] + [r["rationale"] for r in train_rows]
        model_bytes = train_sentencepiece(texts, cfg.scratch_vocab_size)
    return tokenizer_from_sentencepiece(broadcast_bytes(model_bytes, env))


def prepare_data(cfg: TrainConfig, env: DistEnv) -> Data:
    rows = load_rows(cfg)
    tokenizer = resolve_tokenizer(cfg, rows["train"], env)
    splits = {name: encode_split(split_rows, tokenizer, cfg.max_input_length, cfg.max_target_length)
              for name, split_rows in rows.items()}
    return Data(tokenizer=tokenizer, splits=splits)
