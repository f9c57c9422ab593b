"""The training config: one flat dataclass whose fields are the CLI flags.

Resolution order (later wins): the defaults below (the built-in demo), a preset or YAML/JSON file
given with ``--config``, then flags. Every value is checked here, before anything is written, so a
bad flag, key or value ends the run with one line naming it (``UsageError`` -> exit code 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cotmi_ds.data import DATASETS
from cotmi_ds.errors import UsageError, not_utf8
from cotmi_ds.losses import LOSSES, MI_VARIANTS
from cotmi_ds.modes import LABEL_TYPES, MODES, mode_of

PRESET_DIR = Path(__file__).parent / "presets"
FLOAT32_MAX = 3.4028234663852886e38
MAX_CHUNK_MIB = 1 << 20  # 1 TiB of logits per chunk: more than any device holds
PRECISIONS = ("auto", "bf16", "fp32", "fp16")
FP16_REFUSAL = ("fp16 is refused for T5 students: T5's activations overflow fp16's range, which turns "
                "the loss into inf/NaN; use bf16 (GPUs since Ampere) or fp32")

__all__ = ["TrainConfig", "load_config", "read_config_file", "describe_flags",
           "resolve_global_batch", "describe_batch"]


def _opt(default: Any, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # --- run -------------------------------------------------------------------------------
    output_dir: str | None = _opt(None, "run directory; default runs/<dataset>-<mode>-<timestamp>")
    overwrite: bool = _opt(False, "replace the run in a non-empty output_dir: its contents are deleted once "
                           "every input is checked (a folder that holds no run is refused)")
    seed: int = _opt(0, "seed for data order, model init and the synthetic data")
    # --- model ----------------------------------------------------------------------------
    model: str = _opt("scratch", "HF name or local path of a T5 checkpoint (from_pretrained), "
                      "or 'scratch' for a T5 built from the scratch_* fields")
    tokenizer: str | None = _opt(None, "HF name or path; default: the model's own, or for 'scratch' "
                                 "a sentencepiece model trained on the training data")
    scratch_vocab_size: int = _opt(512, "sentencepiece vocabulary size (upper bound) for 'scratch'")
    scratch_d_model: int = _opt(64, "hidden size of the scratch T5")
    scratch_d_ff: int = _opt(256, "feed-forward size of the scratch T5 (gated-GELU, as T5 v1.1)")
    scratch_num_layers: int = _opt(2, "encoder layers (and decoder layers) of the scratch T5")
    scratch_num_heads: int = _opt(4, "attention heads of the scratch T5")
    scratch_d_kv: int = _opt(16, "size of each attention head of the scratch T5")
    dropout: float | None = _opt(None, "dropout rate of the student; default: the checkpoint's own "
                                 "(0.1 for T5), 0 for scratch")
    # --- data -----------------------------------------------------------------------------
    dataset: str = _opt("synthetic", "which dataset to train on: the embedded synthetic one, or a DSS "
                        "benchmark read from --data_root", DATASETS)
    data_root: str | None = _opt(None, "folder in DSS's layout (<name>/<name>_train.json, <name>/llm/...); "
                                 "default: ./datasets, else $COTMI_DATA_ROOT")
    label_type: str | None = _opt(None, "training labels: gt (gold) or llm (the teacher's); default: llm for "
                                  "--mode distill, else gt", LABEL_TYPES)
    subsample: float = _opt(1.0, "dataset-size sweep: keep this fraction f of train, drawn as DSS does "
                            "(train_test_split(test_size=1-f, seed=--seed))")
    data_cache: bool = _opt(True, "reuse tokenized splits from the on-disk cache (keyed by everything that "
                            "changes them)")
    data_cache_dir: str | None = _opt(None, "cache folder; default: <HF datasets cache>/cotmi_ds")
    synthetic_train_size: int = _opt(6000, "training examples of the embedded synthetic dataset")
    synthetic_eval_size: int = _opt(400, "valid and test examples (each) of the synthetic dataset")
    max_input_length: int = _opt(1024, "encoder inputs are truncated to this many tokens")
    max_target_length: int = _opt(256, "labels and rationales are truncated to this many tokens")
    # --- method ---------------------------------------------------------------------------
    mode: str = _opt("mi", "training mode (docs/method.md)", tuple(MODES))
    alpha: float = _opt(0.5, "weight of the label CE; the rationale CE gets 1 - alpha")
    beta: float = _opt(0.1, "weight of the MI term (mode mi)")
    mi_variant: str = _opt("paper", "MI formula: 'paper' reproduces the released code exactly; 'masked' "
                           "excludes padding, uses log-probabilities and a normalised target", MI_VARIANTS)
    loss: str = _opt("fused", "loss implementation: 'fused' computes CE and MI from decoder states in "
                     "chunks (no [B, T, V] logits); 'reference' is the plain one", LOSSES)
    loss_chunk_mib: float = _opt(0.0, "fused loss: MiB of fp32 logits per chunk of positions; "
                                 "0 = 32 on CPUs, 256 on GPUs")
    encoder_once: bool = _opt(True, "fused loss: run the encoder once on both prefixes (one batch of 2B)")
    gradient_checkpointing: bool = _opt(False, "activation checkpointing: keep only each encoder and decoder "
                                        "layer's input and recompute the layer in the backward (much less "
                                        "activation memory for about one more forward pass of compute)")
    cpu_backward_mmap_mib: float = _opt(4.0, "CPU runs with --gradient_checkpointing: in the backward, glibc "
                                        "maps blocks of at least this many MiB on their own, so what the "
                                        "backward frees leaves the process (lower peak RSS, a few % slower; "
                                        "training/host_memory.py); 0 = glibc's own behaviour")
    lean_layers: bool = _opt(True, "T5's RMSNorm and gelu_new as single autograd operations that keep their "
                             "input only (about 30% less activation memory at t5-base shapes, faster on CPUs); "
                             "the same functions, results differ by rounding; false: transformers' layers as written")
    # --- optimisation ---------------------------------------------------------------------
    max_steps: int = _opt(1000, "optimizer steps")
    batch_size: int = _opt(32, "micro-batch per device (examples; each runs both tasks); with "
                           "--global_batch_size, the largest micro-batch allowed")
    grad_accum: int = _opt(1, "gradient accumulation steps (derived when --global_batch_size is set)")
    global_batch_size: int = _opt(0, "examples per optimizer step over all ranks (0: unset, then it is "
                                  "batch_size x grad_accum x ranks); sets the micro-batch (at most "
                                  "--batch_size) and the accumulation for the world size")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    warmup_steps: int = _opt(0, "linear warm-up steps, then linear decay to 0 at max_steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    precision: str = _opt("auto", "auto = bf16 on GPUs that support it, else fp32; "
                          "fp16 is refused for T5 (it overflows)", PRECISIONS)
    # --- distributed ----------------------------------------------------------------------
    ds_config: str = _opt("auto", "DeepSpeed config: a shipped name (zero0..zero3, zero3_offload; `cotmi ds_config "
                          "NAME` prints one) or a JSON file path; 'auto': zero0 on one process, zero2 on several, "
                          "and a resumed run keeps its checkpoint's stage")
    dist_timeout_s: int = _opt(600, "collective timeout; a hung rank becomes an error after this")
    # --- checkpoints and resume -----------------------------------------------------------
    save_every: int = _opt(500, "save a checkpoint every N steps (0: only at the end); always at the end "
                           "and on SIGTERM/SIGUSR1")
    keep_last: int = _opt(2, "keep the newest N checkpoints (0: keep all)")
    resume: str | None = _opt(None, "'auto': continue from the latest checkpoint in --output_dir (start "
                              "fresh if it has none); or the path of a run, its checkpoints/ or one "
                              "checkpoint")
    max_bad_steps: int = _opt(10, "stop (exit 3) after this many consecutive micro-batches with a NaN/inf "
                              "loss (each one is skipped without an optimizer update), or this many "
                              "consecutive optimizer updates skipped for non-finite gradients")
    # --- evaluation and logging -----------------------------------------------------------
    eval_every: int = _opt(250, "evaluate by generation every N steps (0: only at the end)")
    eval_batch_size: int = _opt(64, "examples per generate() call and rank")
    eval_max_examples: int = _opt(0, "evaluations during training use only the first N examples of "
                                  "valid and test (0: all); the final evaluation always uses all")
    max_new_tokens: int = _opt(64, "generation length cap for evaluation")
    log_every: int = _opt(25, "log metrics every N steps")
    eval_rationales: int = _opt(64, "at each evaluation also generate rationales (from the explain prompt) "
                                "for the first N examples of each split, written beside the predictions and "
                                "scored against the teacher's (BLEU, chrF); modes dss and mi only; 0: none")
    sync_timers: bool = _opt(True, "synchronise the GPU around each timed phase so time/*_ms split "
                             "the step honestly (costs a little speed; no effect on CPU)")

    # ------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise UsageError(msg)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UsageError(f"--{f.name} {value!r} is not one of: {', '.join(choices)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name} must be a finite number, got {value}")
        need(self.precision != "fp16", f"--precision fp16: {FP16_REFUSAL}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "max_new_tokens",
                     "log_every", "max_input_length", "max_target_length", "dist_timeout_s", "max_bad_steps",
                     "synthetic_train_size", "synthetic_eval_size", "scratch_vocab_size",
                     "scratch_d_model", "scratch_d_ff", "scratch_num_layers", "scratch_num_heads",
                     "scratch_d_kv"):
            need(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("eval_every", "eval_max_examples", "warmup_steps", "weight_decay", "grad_clip", "beta",
                     "save_every", "keep_last", "global_batch_size"):
            need(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")
        need(self.eval_rationales >= 0, f"--eval_rationales must be >= 0, got {self.eval_rationales}")
        need(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        need(0.0 < self.subsample <= 1.0, f"--subsample must be in (0, 1], got {self.subsample}")
        self._check_mode_flags()
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise UsageError(f"--data_root {self.data_root}: no such directory")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.loss_chunk_mib <= MAX_CHUNK_MIB,
             f"--loss_chunk_mib must be in [0, {MAX_CHUNK_MIB}] (0: automatic), got {self.loss_chunk_mib}")
        need(0 <= self.cpu_backward_mmap_mib <= 32,  # glibc refuses a threshold above 32 MiB
             f"--cpu_backward_mmap_mib must be in [0, 32] (0: glibc's own behaviour), got {self.cpu_backward_mmap_mib}")
        need(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
             f"--adam_beta1/--adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        need(self.adam_eps > 0, f"--adam_eps must be > 0, got {self.adam_eps}")
        # Adam's first step moves each weight by up to lr / (1 - beta1), computed in float32.
        need(self.lr / (1.0 - self.adam_beta1) < FLOAT32_MAX,
             f"--lr {self.lr:g} is too large: Adam's first step (lr / (1 - adam_beta1)) overflows float32")
        need(self.dropout is None or 0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.warmup_steps < self.max_steps,
             f"--warmup_steps ({self.warmup_steps}) must be < --max_steps ({self.max_steps})")
        need(self.scratch_vocab_size >= 64, f"--scratch_vocab_size must be >= 64, got {self.scratch_vocab_size}")
        need(self.resume != "auto" or self.output_dir is not None,
             "--resume auto needs --output_dir (the run directory to continue; a new run gets a fresh name)")
        need(self.resume is None or self.resume.strip() != "", "--resume: give 'auto' or a path")
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            if value and value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().is_dir():
                raise UsageError(f"--{name} {value}: no such directory (give a folder written by "
                                 "save_pretrained, or a hub name such as google/t5-v1_1-base)")
        if self.model != "scratch" and any(
                getattr(self, f.name) != f.default for f in dataclasses.fields(self)
                if f.name.startswith("scratch_")):
            raise UsageError("the scratch_* flags only apply to --model scratch; "
                             f"--model {self.model} brings its own architecture")
        return self

    def _check_mode_flags(self) -> None:
        """standard and distill are defined by their labels (docs/method.md): a contradiction is an
        error. (--alpha/--beta are simply unused by the modes without those terms, so one sweep
        file can serve every mode.)"""
        implied = mode_of(self).label_type
        if implied and self.label_type not in (None, implied):
            other = next(m.name for m in MODES.values() if m.label_type == self.label_type)
            raise UsageError(f"--mode {self.mode} trains on {implied} labels; for --label_type "
                             f"{self.label_type} use --mode {other}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- building a config from a file and flags ----------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(_FIELDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(name: str, value: Any, where: str) -> Any:
    """Convert a flag/file value to the field's type, or raise a UsageError naming it."""
    hint = _TYPES[name]
    optional = type(None) in typing.get_args(hint)
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    bad = UsageError(f"{where}: expected {base.__name__}{' or null' if optional else ''}, got {value!r}")
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise bad
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if base is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    return _coerce(name, float(value), where)
                except ValueError:
                    raise bad from None
        if isinstance(value, int):
            return value
        raise bad
    if base is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise AssertionError(f"unhandled config type {hint} for {name}")


def read_config_file(spec: str) -> tuple[dict[str, Any], str]:
    """A preset name (cotmi_ds/presets/<name>.yaml) or a path to a YAML/JSON mapping."""
    path = Path(spec)
    if not path.exists() and (PRESET_DIR / f"{spec}.yaml").exists():
        path = PRESET_DIR / f"{spec}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise UsageError(f"--config {spec}: no such file or preset (presets: {', '.join(presets)})")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: {not_utf8(e)}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        line = getattr(e, "lineno", None) or (mark.line + 1 if mark else "?")
        raise UsageError(f"{path}:{line}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{getattr(e, 'msg', None) or getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data, str(path)


def _read_values(spec: str, chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """A config file's values (its ``extends`` first, then its own) and the flags it ``require``s.
    These two keys are not flags: ``extends`` names a preset or file this one overrides,
    ``require`` the flags the command line must give (the paper presets need --dataset)."""
    data, where = read_config_file(spec)
    if where in chain:
        raise UsageError(f"{where}: extends itself (through {' -> '.join(chain)})")
    base, require = data.pop("extends", None), data.pop("require", [])
    if not isinstance(require, list):
        raise UsageError(f"{where}: require: expected a list of flag names, got {require!r}")
    values, required = _read_values(str(base), (*chain, where)) if base is not None else ({}, [])
    for key, value in data.items():
        if key not in _FIELDS:
            raise UsageError(f"{where}: unknown key {key!r}{_suggest(str(key))}")
        values[key] = _coerce(key, value, f"{where}: {key}")
    return values, [*required, *require]


def load_config(config: str | None = None, **flags: Any) -> TrainConfig:
    """Defaults <- file or preset <- flags, every key checked and every value coerced."""
    values, required = _read_values(str(config)) if config is not None else ({}, [])
    for key in required:
        if key not in flags:
            choices = _FIELDS[key].metadata.get("choices") if key in _FIELDS else None
            raise UsageError(f"--config {config} needs --{key}"
                             + (f" (one of: {', '.join(choices)})" if choices else ""))
    for key, value in flags.items():
        if key not in _FIELDS:
            raise UsageError(f"unknown flag --{key}{_suggest(key)}")
        values[key] = _coerce(key, value, f"--{key}")
    cfg = TrainConfig(**values).validate()
    if cfg.global_batch_size and "grad_accum" in flags:
        raise UsageError(f"--grad_accum is derived from --global_batch_size ({cfg.global_batch_size}); "
                         "give one of them (--global_batch_size 0 unsets it)")
    return cfg


def resolve_global_batch(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """With --global_batch_size G on W ranks: the micro-batch m and accumulation a with m * a * W = G,
    a as small as possible with m <= --batch_size. Unset (0): the config as given."""
    if not cfg.global_batch_size:
        return cfg
    per_rank, rest = divmod(cfg.global_batch_size, world_size)
    if rest:
        raise UsageError(f"--global_batch_size {cfg.global_batch_size} is not divisible by the {world_size} "
                         f"ranks; use a multiple of {world_size} or another number of ranks")
    accum = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= cfg.batch_size)
    return dataclasses.replace(cfg, batch_size=per_rank // accum, grad_accum=accum)


def describe_batch(cfg: TrainConfig, world_size: int) -> str:
    """One line: the global batch and how it is made up."""
    given = f" (--global_batch_size {cfg.global_batch_size})" if cfg.global_batch_size else ""
    return (f"{cfg.batch_size * cfg.grad_accum * world_size} examples per optimizer step{given} = micro-batch "
            f"{cfg.batch_size} x {cfg.grad_accum} accumulation step(s) x {world_size} rank(s)")


def describe_flags() -> str:
    """One line per flag, for `cotmi train --help`."""
    lines = []
    for name, f in _FIELDS.items():
        choices = f.metadata.get("choices")
        extra = f" {{{', '.join(choices)}}}" if choices else ""
        lines.append(f"  --{name} (default {f.default!r}){extra}: {f.metadata['help']}")
    return "\n".join(lines)
