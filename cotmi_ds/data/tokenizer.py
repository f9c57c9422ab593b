"""Tokenizers: an HF name/path through from_pretrained, or a sentencepiece model trained on the fly."""
from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Tokenizer

from cotmi_ds.config import TrainConfig
from cotmi_ds.errors import UsageError
from cotmi_ds.files import read_json
from cotmi_ds.model.hub import resolve


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    Digits are split so that any number is spelled from ten pieces the model learns to copy;
    ``hard_vocab_limit=False`` lets a small corpus end up with fewer pieces than asked for.
    """
    texts = list(texts)
    # Every character gets a piece when they fit in half the vocabulary (the synthetic data);
    # text with many rare characters (Wikipedia premises) keeps sentencepiece's usual 99.95%.
    n_chars = len(set().union(*map(set, texts))) if texts else 0
    coverage = 1.0 if n_chars <= vocab_size // 2 else 0.9995
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, split_digits=True,
            character_coverage=coverage, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        if "required_chars" not in str(e):
            raise
        raise UsageError(f"--scratch_vocab_size {vocab_size} is too small for the {n_chars} distinct characters "
                         "of the training text; raise it, or pass a real tokenizer with --tokenizer") from None
    return model.getvalue()


def tokenizer_from_sentencepiece(model_bytes: bytes) -> PreTrainedTokenizerBase:
    """A T5 tokenizer (no sentinel tokens) over a sentencepiece model, ready for save_pretrained."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model_bytes)
        return T5Tokenizer.from_pretrained(tmp, extra_ids=0)


def given_tokenizer(cfg: TrainConfig) -> tuple[str, str] | None:
    """(name or path, the flag that named it) of the tokenizer to load: --tokenizer, else the
    model's own; None for a scratch model without --tokenizer (one is trained on the data)."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer, "--tokenizer"
    return None if cfg.model == "scratch" else (cfg.model, "--model")


# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone describes one, holds none).
VOCABULARY_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "vocab.json",
                    "vocab.txt")


# Tokenizers whose vocabulary is built in (ByT5's: the 256 bytes and its special tokens).
VOCABULARY_FREE = ("ByT5Tokenizer",)


def _needs_no_vocabulary(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    data = read_json(config)
    return isinstance(data, dict) and data.get("tokenizer_class") in VOCABULARY_FREE


def load_tokenizer(name_or_path: str, flag: str = "--tokenizer") -> PreTrainedTokenizerBase:
    """``flag``: where the name came from (--tokenizer, or --model for the model's own tokenizer)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in VOCABULARY_FILES) \
            and not _needs_no_vocabulary(folder):
        raise UsageError(f"{flag} {name_or_path}: no tokenizer vocabulary in this folder (none of "
                         f"{', '.join(VOCABULARY_FILES)}); pass a folder written by save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(resolve(name_or_path, flag, "tokenizer"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name_or_path}: cannot load a tokenizer: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise UsageError(f"{flag} {name_or_path}: a T5 student needs pad and eos tokens")
    return tok


def run_tokenizer(cfg) -> PreTrainedTokenizerBase | None:
    """A run's tokenizer (``cfg``: TrainConfig): --tokenizer's, else a pretrained model's own; None
    for a scratch model without --tokenizer (one is trained on its data)."""
    given = given_tokenizer(cfg)
    return load_tokenizer(*given) if given else None


def labels_lost(tokenizer: PreTrainedTokenizerBase, labels: Iterable[str]) -> tuple[list[tuple[str, str]], int]:
    """The distinct labels that do not come back from encoding and decoding (whitespace aside: a
    tokenizer may normalise it), as (label, what came back), and the number of distinct labels. A
    label the tokenizer cannot spell is one the student can never produce."""
    distinct = sorted(set(labels))
    if not distinct:
        return [], 0
    back = tokenizer.batch_decode(tokenizer(distinct, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    return [(y, b) for y, b in zip(distinct, back) if "".join(y.split()) != "".join(b.split())], len(distinct)
