"""The training config: one flat dataclass whose fields are the CLI flags.

Resolution order (later wins): the defaults below (the built-in demo), a preset or YAML/JSON file
given with ``--config``, then flags. Every value is checked here, before anything is written, so a
bad flag, key or value ends the run with one line naming it (``UsageError`` -> exit code 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cotmi_ds.data import DATASET_TASKS, DATASETS, TASK_KINDS
from cotmi_ds.errors import UsageError, brief
from cotmi_ds.files import read_json, read_yaml
from cotmi_ds.flags import check_fields, coerce, suggest
from cotmi_ds.flags import flag as _opt  # every field is a flag: default, help, choices, range
from cotmi_ds.losses import LOSSES, MI_VARIANTS
from cotmi_ds.modes import LABEL_TYPES, MODES, mode_of

PRESET_DIR = Path(__file__).parent / "presets"
FLOAT32_MAX = 3.4028234663852886e38
MAX_SEED = 2**32 - 1
MAX_CHUNK_MIB = 1 << 20  # 1 TiB of logits per chunk: more than any device holds
PRECISIONS = ("auto", "bf16", "fp32", "fp16")
FP16_REFUSAL = ("fp16 is refused for T5 students: T5's activations overflow fp16's range, which turns "
                "the loss into inf/NaN; use bf16 (GPUs since Ampere) or fp32")
ATTENTIONS = ("sdpa", "eager")  # transformers' names (attn_implementation)

# --lr's default by where the student's weights come from: the small scratch T5 of the demo trains
# at 3e-3; a pretrained T5 is fine-tuned at 5e-5 in the published set-up (Distilling Step-by-Step and
# Chen et al. 2024, AdamW), and 3e-3 undoes what it learned in pre-training within a few steps.
DEFAULT_LR = {"scratch": 3e-3, "pretrained": 5e-5}
# The rates used to fine-tune pretrained T5 with Adam-style optimizers, from 1e-5 (the low end of
# BERT-style fine-tuning) to 1e-3 (the T5 paper's constant Adafactor rate, Raffel et al. 2020;
# transformers' T5 guide suggests 1e-4 to 3e-4 with AdamW). Outside it a pretrained student is warned.
PRETRAINED_LR_RANGE = (1e-5, 1e-3)

__all__ = ["TrainConfig", "load_config", "read_config_file", "resolve_global_batch", "describe_batch",
           "describe_lr", "describe_settings", "student_origin"]


def _exists(path: str) -> bool:
    """Whether ``path`` names something on disk; a name the system cannot even look up (too long,
    a NUL byte) names nothing."""
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):
        return False


def _rate(x: float) -> str:
    """A learning rate as people write one: 3e-3, 5e-5, 1.5e-4."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


@dataclass
class TrainConfig:
    # --- run -------------------------------------------------------------------------------
    output_dir: str | None = _opt(None, "run directory; default runs/<dataset>-<mode>-<timestamp>", paths=True,
                                  section="Run")
    overwrite: bool = _opt(False, "replace the run in --output_dir: once every input is checked and the new run has "
                           "started, what cotmi wrote there (checkpoints, results, TensorBoard, ...) is removed, "
                           "other files are kept; a directory without cotmi_run.json (the mark of a run cotmi train "
                           "made) is refused")
    seed: int = _opt(0, "seed for data order, model init and the synthetic data", range=f"[0, {MAX_SEED}]",
                     note="numpy's seeds are 32-bit")
    # --- model ----------------------------------------------------------------------------
    model: str = _opt("scratch", "HF name or local path of a T5-family checkpoint (T5, Flan-T5, ByT5, mT5; "
                      "from_pretrained), or 'scratch' for a T5 built from the scratch_* fields", paths=True,
                      section="Student")
    tokenizer: str | None = _opt(None, "HF name or path; default: the model's own, or for 'scratch' "
                                 "a sentencepiece model trained on the training data", paths=True)
    scratch_vocab_size: int = _opt(512, "sentencepiece vocabulary size (upper bound) for 'scratch'", range=">= 64")
    scratch_d_model: int = _opt(64, "hidden size of the scratch T5", range="> 0")
    scratch_d_ff: int = _opt(256, "feed-forward size of the scratch T5 (gated-GELU, as T5 v1.1)", range="> 0")
    scratch_num_layers: int = _opt(2, "encoder layers (and decoder layers) of the scratch T5", range="> 0")
    scratch_num_heads: int = _opt(4, "attention heads of the scratch T5", range="> 0")
    scratch_d_kv: int = _opt(16, "size of each attention head of the scratch T5", range="> 0")
    dropout: float | None = _opt(None, "dropout rate of the student; default: the checkpoint's own "
                                 "(0.1 for T5), 0 for scratch", range="[0, 1)")
    # --- data -----------------------------------------------------------------------------
    dataset: str = _opt("synthetic", "which dataset to train on: the embedded synthetic one, a DSS benchmark "
                        "read from --data_root, or the path of your own task's data (a .jsonl/.json/.csv/.parquet "
                        "file or a folder of split files; docs/own-task.md)", DATASETS, paths=True, section="Data")
    task: str | None = _opt(None, "how answers are scored: choice, exact (the text) or numeric (the value of a number "
                            "or arithmetic expression); for your own data, default: the task in its folder's "
                            "manifest.json (written by cotmi teach); a built-in dataset has its own", TASK_KINDS)
    data_root: str | None = _opt(None, "folder in DSS's layout (<name>/<name>_train.json, <name>/llm/...); "
                                 "default: ./datasets, else $COTMI_DATA_ROOT", paths=True)
    label_type: str | None = _opt(None, "training labels: gt (gold) or llm (the teacher's); default: llm for "
                                  "--mode distill, else gt", LABEL_TYPES)
    subsample: float = _opt(1.0, "dataset-size sweep: keep this fraction f of train, drawn as DSS does "
                            "(train_test_split(test_size=1-f, seed=--seed))", range="(0, 1]")
    data_cache: bool = _opt(True, "reuse tokenized splits from the on-disk cache (keyed by everything that "
                            "changes them)")
    data_cache_dir: str | None = _opt(None, "cache folder; default: <HF datasets cache>/cotmi_ds", paths=True)
    synthetic_train_size: int = _opt(6000, "training examples of the embedded synthetic dataset", range="> 0")
    synthetic_eval_size: int = _opt(400, "valid and test examples (each) of the synthetic dataset", range="> 0")
    max_input_length: int = _opt(1024, "encoder inputs are truncated to this many tokens", range="> 0")
    max_target_length: int = _opt(256, "labels and rationales are truncated to this many tokens", range="> 0")
    group_by_length: bool = _opt(False, "length-grouped batches: each mega-batch of 50 global batches is sorted "
                                 "by row length (inputs + targets), so batches pad little (as the HF Trainer's "
                                 "group_by_length); false: rows in random order, as the released code")
    # --- method ---------------------------------------------------------------------------
    mode: str = _opt("mi", "training mode (docs/method.md)", tuple(MODES), section="Method")
    alpha: float = _opt(0.5, "weight of the label CE; the rationale CE gets 1 - alpha", range="[0, 1]")
    beta: float = _opt(0.1, "weight of the MI term (mode mi)", range=">= 0")
    mi_variant: str = _opt("paper", "MI formula: 'paper' reproduces the released code exactly; 'masked' "
                           "excludes padding, uses log-probabilities and a normalised target", MI_VARIANTS)
    loss: str = _opt("fused", "loss implementation: 'fused' computes CE and MI from decoder states in "
                     "chunks (no [B, T, V] logits); 'reference' is the plain one", LOSSES)
    loss_chunk_mib: float = _opt(0.0, "fused loss: MiB of fp32 logits per chunk of positions; "
                                 "0 = 32 on CPUs, 256 on GPUs", range=f"[0, {MAX_CHUNK_MIB}]", note="0: automatic")
    encoder_once: bool = _opt(True, "fused loss: run the encoder once on both prefixes (one batch of 2B)")
    gradient_checkpointing: bool = _opt(False, "activation checkpointing: keep only each encoder and decoder "
                                        "layer's input and recompute the layer in the backward (much less "
                                        "activation memory for about one more forward pass of compute)")
    cpu_backward_mmap_mib: float = _opt(4.0, "CPU runs with --gradient_checkpointing: in the backward, glibc "
                                        "maps blocks of at least this many MiB on their own, so what the "
                                        "backward frees leaves the process (lower peak RSS, a few % slower; "
                                        "training/host_memory.py)",
                                        range="[0, 32]", note="0: glibc's own behaviour")  # glibc refuses more
    lean_layers: bool = _opt(True, "T5's RMSNorm and gelu_new as single autograd operations that keep their "
                             "input only (about 30% less activation memory at t5-base shapes, faster on CPUs); "
                             "the same functions, results differ by rounding; false: transformers' layers as written")
    attention: str = _opt("sdpa", "T5's attention: 'sdpa' runs torch's scaled_dot_product_attention with the "
                          "position bias and padding mask as one additive mask (the same function as eager, equal "
                          "to rounding); 'eager' is transformers' matmul-softmax-matmul, as the released code ran",
                          ATTENTIONS)
    compile: bool = _opt(False, "torch.compile each encoder and decoder block (regional compilation; the first "
                         "steps compile, the time is reported); not with ZeRO-3 or without a C compiler")
    flush_subnormals: bool = _opt(True, "CPU arithmetic treats subnormal floats (below 1.2e-38) as zero, as "
                                  "TensorFlow's CPU kernels do: x86 cores run them up to 100x slower, and a large-"
                                  "logit softmax is largely subnormal; results differ far below fp32's rounding; "
                                  "false: IEEE behaviour, as the released code ran")
    # --- optimisation ---------------------------------------------------------------------
    max_steps: int = _opt(1000, "optimizer steps", range="> 0", section="Optimisation")
    batch_size: int = _opt(32, "micro-batch per device (examples; each runs both tasks); with "
                           "--global_batch_size, the largest micro-batch allowed", range="> 0")
    grad_accum: int = _opt(1, "gradient accumulation steps (derived when --global_batch_size is set)", range="> 0")
    global_batch_size: int = _opt(0, "examples per optimizer step over all ranks (0: unset, then it is "
                                  "batch_size x grad_accum x ranks); sets the micro-batch (at most "
                                  "--batch_size) and the accumulation for the world size", range=">= 0")
    lr: float | None = _opt(None, f"peak learning rate (AdamW); default by the student: {_rate(DEFAULT_LR['scratch'])} "
                            f"for --model scratch, {_rate(DEFAULT_LR['pretrained'])} for a pretrained one",
                            range="> 0")
    warmup_steps: int = _opt(0, "linear warm-up steps, then linear decay to 0 at max_steps", range=">= 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay", range=">= 0")
    adam_beta1: float = _opt(0.9, "AdamW beta1", range="[0, 1)")
    adam_beta2: float = _opt(0.999, "AdamW beta2", range="[0, 1)")
    adam_eps: float = _opt(1e-8, "AdamW epsilon", range="> 0")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)", range=">= 0")
    precision: str = _opt("auto", "auto = bf16 on GPUs that support it, else fp32; "
                          "fp16 is refused for T5 (it overflows)", PRECISIONS)
    # --- distributed ----------------------------------------------------------------------
    ds_config: str = _opt("auto", "DeepSpeed config: a shipped name (zero0..zero3, zero3_offload; `cotmi ds_config "
                          "NAME` prints one) or a JSON file path; 'auto': zero0 on one process, zero2 on several, "
                          "and a resumed run keeps its checkpoint's stage", section="Distributed", paths=True)
    dist_timeout_s: int = _opt(600, "collective timeout; a hung rank becomes an error after this", range="> 0")
    # --- checkpoints and resume -----------------------------------------------------------
    save_every: int = _opt(500, "save a checkpoint every N steps (0: only at the end); always at the end "
                           "and on SIGTERM/SIGUSR1", range=">= 0", section="Checkpoints and resume")
    keep_last: int = _opt(2, "keep the newest N checkpoints (0: keep all)", range=">= 0")
    resume: str | None = _opt(None, "'auto': continue from the latest checkpoint in --output_dir (start "
                              "fresh if it has none); or the path of a run, its checkpoints/ or one "
                              "checkpoint", paths=True)
    max_bad_steps: int = _opt(10, "stop (exit 3) after this many consecutive optimizer updates skipped "
                              "for a NaN/inf loss or non-finite gradients (a skipped update changes nothing)",
                              range="> 0")
    # --- evaluation and logging -----------------------------------------------------------
    eval_every: int = _opt(250, "evaluate by generation every N steps (0: only at the end)", range=">= 0",
                           section="Evaluation and logging")
    eval_batch_size: int = _opt(64, "examples per generate() call and rank", range="> 0")
    eval_max_examples: int = _opt(0, "evaluations during training use only the first N examples of "
                                  "valid and test (0: all); the final evaluation always uses all", range=">= 0")
    max_new_tokens: int = _opt(64, "generation length cap for evaluation (at most --max_target_length: labels are "
                               "cut to that many tokens, so a longer generation is never right)", range="> 0")
    log_every: int = _opt(25, "log metrics every N steps", range="> 0")
    eval_rationales: int = _opt(64, "at each evaluation also generate rationales (from the explain prompt) "
                                "for the first N examples of each split, written beside the predictions and "
                                "scored against the teacher's (BLEU, chrF); modes dss and mi only; 0: none",
                                range=">= 0")

    # ------------------------------------------------------------------------------------
    def __post_init__(self):
        if self.lr is None:  # not given: the student's own default
            self.lr = DEFAULT_LR[student_origin(self.model)]

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise UsageError(msg)

        check_fields(self)  # each field's choices and range
        need(self.precision != "fp16", f"--precision fp16: {FP16_REFUSAL}")
        self._check_dataset()
        self._check_mode_flags()
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise UsageError(f"--data_root {self.data_root}: no such directory")
        # Adam's first step moves each weight by up to lr / (1 - beta1), computed in float32.
        need(self.lr / (1.0 - self.adam_beta1) < FLOAT32_MAX,
             f"--lr {self.lr:g} is too large: Adam's first step (lr / (1 - adam_beta1)) overflows float32")
        need(self.warmup_steps < self.max_steps,
             f"--warmup_steps ({self.warmup_steps}) must be < --max_steps ({self.max_steps})")
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

    def _check_dataset(self) -> None:
        """A built-in name, or the path of your own data (read and checked by data/own.py)."""
        if self.dataset in DATASETS:
            kind = DATASET_TASKS[self.dataset]
            if self.task not in (None, kind):
                raise UsageError(f"--task {self.task}: {self.dataset} is a {kind} task; leave --task out for a "
                                 "built-in dataset")
        elif not _exists(self.dataset):
            close = difflib.get_close_matches(self.dataset, DATASETS, n=1)
            shown = self.dataset if len(self.dataset) <= 200 else brief(self.dataset)
            raise UsageError(f"--dataset {shown}: no such file or folder, and not a built-in dataset "
                             f"({', '.join(DATASETS)})" + (f"; did you mean {close[0]!r}?" if close else ""))

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


def read_config_file(spec: str, relative_to: Path | None = None) -> tuple[dict[str, Any], str]:
    """A preset name (cotmi_ds/presets/<name>.yaml) or a path to a YAML/JSON mapping, read with the
    bounded readers of files.py. ``relative_to``: the folder a relative path is taken from (the one
    of the file that ``extends`` it), else the working directory."""
    path = Path(spec).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.exists() and (PRESET_DIR / f"{spec}.yaml").exists():
        path = PRESET_DIR / f"{spec}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        where = f" (relative to {relative_to})" if relative_to is not None else ""
        raise UsageError(f"--config {spec}: no such file{where} or preset (presets: {', '.join(presets)})")
    data = read_json(path) if path.suffix == ".json" else read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data, str(path)


def _read_values(spec: str, chain: tuple[str, ...] = (), relative_to: Path | None = None
                 ) -> tuple[dict[str, Any], list[str]]:
    """A config file's values (its ``extends`` first, then its own) and the flags it ``require``s.
    These two keys are not flags: ``extends`` names a preset or file this one overrides (a relative
    path is taken from this file's folder), ``require`` the flags the command line must give (the
    paper presets need --dataset)."""
    data, where = read_config_file(spec, relative_to)
    if where in chain:
        raise UsageError(f"{where}: extends itself (through {' -> '.join(chain)})")
    base, require = data.pop("extends", None), data.pop("require", [])
    if base is not None and not isinstance(base, str):
        raise UsageError(f"{where}: extends: expected a preset name or a file, got {brief(base)}")
    if not isinstance(require, list) or not all(isinstance(k, str) for k in require):
        raise UsageError(f"{where}: require: expected a list of flag names, got {brief(require)}")
    unknown = next((k for k in require if k not in _FIELDS), None)
    if unknown is not None:
        raise UsageError(f"{where}: require: unknown flag {unknown!r}{suggest(unknown, _FIELDS)}")
    values, required = (_read_values(base, (*chain, where), Path(where).parent) if base is not None
                        else ({}, []))
    for key, value in data.items():
        if key not in _FIELDS:
            raise UsageError(f"{where}: unknown key {brief(key)}{suggest(str(key), _FIELDS)}")
        values[key] = coerce(value, _TYPES[key], f"{where}: {key}")
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
            raise UsageError(f"unknown flag --{key}{suggest(key, _FIELDS)}")
        values[key] = coerce(value, _TYPES[key], f"--{key}")
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


def student_origin(model: str) -> str:
    """'scratch' (a T5 built from the scratch_* flags) or 'pretrained' (weights from a folder or the hub)."""
    return "scratch" if model == "scratch" else "pretrained"


def describe_lr(cfg: TrainConfig) -> tuple[str, str | None]:
    """The start-up line on the learning rate (which one and why), and a warning when a pretrained
    student gets a rate outside PRETRAINED_LR_RANGE (None otherwise)."""
    origin = student_origin(cfg.model)
    default, (other, other_default) = DEFAULT_LR[origin], next((o, v) for o, v in DEFAULT_LR.items() if o != origin)
    why = " (the published set-up's)" if origin == "pretrained" else ""
    line = (f"lr {_rate(cfg.lr)}: the default for a {origin} student{why}; a {other} one gets {_rate(other_default)}"
            if cfg.lr == default else f"lr {_rate(cfg.lr)}: as given (the default for a {origin} student is {_rate(default)})")
    low, high = PRETRAINED_LR_RANGE
    if origin != "pretrained" or low <= cfg.lr <= high:
        return line, None
    effect = ("steps this large can wreck what the student learned in pre-training within a few steps"
              if cfg.lr > high else "the student will barely move from its pre-trained weights")
    return line, (f"--lr {_rate(cfg.lr)} is outside the rates used to fine-tune a pretrained T5 ({_rate(low)} to {_rate(high)}): "
                  f"{effect}; the published set-up uses {_rate(default)} (--lr {_rate(default)}, or leave --lr out)")


def describe_settings(cfg: TrainConfig) -> str:
    """The settings that differ from the built-in defaults, as flags ("" when none do)."""
    changed = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = DEFAULT_LR[student_origin(cfg.model)] if f.name == "lr" else f.default
        if value != default:
            changed.append(f"--{f.name} {value:g}" if isinstance(value, float) else f"--{f.name} {value}")
    return " ".join(changed)
