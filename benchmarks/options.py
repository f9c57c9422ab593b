"""The flags of each `cotmi bench` command: one dataclass per command, each field a flag with its
default, help and accepted values (cotmi_ds/flags.py parses them and writes their --help)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cotmi_ds.flags import flag
from cotmi_ds.losses import MI_VARIANTS

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO / "benchmarks" / "t5-v1_1-base.json"


@dataclass
class StepOptions:
    """`cotmi bench step` (benchmarks/step_bench.py)."""
    gpu: bool = flag(False, "the GPU preset: t5-v1_1-base shapes in bf16, batch 64, inputs 512, rationales 256, "
                            "labels 16, 10 steps (needs CUDA)")
    base: bool = flag(False, "the CPU preset: t5-v1_1-base shapes in fp32, batch 8, inputs 128, rationales 128, "
                             "labels 8, 2 steps")
    model_config: str = flag("", "a T5Config JSON; default: the scratch T5's shapes with T5's 32,128-token vocabulary")
    batch_size: int = flag(0, "examples per step; 0: 32, or the preset's", range=">= 0")
    input_len: int = flag(0, "> 0: fixed-length random batches instead of the synthetic data (give "
                             "--rationale_len and --label_len too)", range=">= 0")
    rationale_len: int = flag(0, "rationale tokens of the fixed-length batches", range=">= 0")
    label_len: int = flag(0, "label tokens of the fixed-length batches", range=">= 0")
    precision: str = flag("", "fp32 or bf16; default: fp32, or the preset's")
    loss: str = flag("", "the project side's --loss; default: the trainer's")
    ds_config: str = flag("", "the project side's --ds_config; default: the trainer's")
    gradient_checkpointing: bool = flag(False, "the project side recomputes activations in the backward")
    lean_layers: bool = flag(True, "the project side's RMSNorm and GELU keep their inputs only (the trainer's "
                                   "default)")
    mode: str = flag("mi", "the training mode of both sides", ("dss", "mi"))
    steps: int = flag(0, "measured steps per side and round; 0: 4, or the preset's", range=">= 0")
    rounds: int = flag(3, "measured rounds (each: project, then released)", range=">= 1")
    warmup_steps: int = flag(2, "steps per side before the first round, not measured", range=">= 0")
    seed: int = flag(0, "seed of the weights and batches", range=">= 0")
    profile: int = flag(0, "after the rounds, this many more steps of each side under torch.profiler (its top "
                           "operators are printed)", range=">= 0")
    lengths: str = flag("", "batches with a benchmark's real token lengths: cqa, svamp, anli1 or esnli (from the data "
                            "with --tokenizer, else the histograms shipped in the package)")
    data_root: str = flag("", "--lengths from the data: the DSS folder (default ./datasets or $COTMI_DATA_ROOT)")
    tokenizer: str = flag("", "--lengths from the data: the student's tokenizer (else the shipped histograms)")
    levers: str = flag("", "with --lengths: the project side's lever settings, comma-separated among none, group, "
                           "sdpa, compile, flush, kernels, all (default: all of them; with --gpu, all but flush)")


@dataclass
class LossOptions:
    """`cotmi bench loss` (benchmarks/loss_bench.py)."""
    device: str = flag("cpu", "where both losses run", ("cpu", "cuda"))
    dtype: str = flag("fp32", "the dtype of the hidden states and the LM head", ("fp32", "bf16"))
    batch: int = flag(8, "examples per step", range="> 0")
    rationale_len: int = flag(256, "rationale tokens", range="> 0")
    label_len: int = flag(8, "label tokens", range="> 0")
    input_len: int = flag(128, "encoder input tokens of the training step", range="> 0")
    vocab: int = flag(32128, "vocabulary size", range="> 0")
    d_model: int = flag(768, "hidden size of the loss-alone table (the training step's T5 is tiny: 64)", range="> 0")
    chunk_mib: float = flag(0.0, "MiB of fp32 logits per chunk of the fused loss", range=">= 0",
                            note="0: automatic")
    mi_variant: str = flag("paper", "the MI formula", MI_VARIANTS)
    repeats: int = flag(2, "processes per variant, alternating", range="> 0")
    steps: int = flag(3, "steps per process", range=">= 2", note="the first step of each process is not timed")
    parts: str = flag("loss,train", "which tables: a comma-separated subset of loss, train")
    threads: int = flag(0, "torch threads in each process; 0: torch's default", range=">= 0")


@dataclass
class MemoryOptions:
    """`cotmi bench memory` (benchmarks/memory_bench.py)."""
    model_config: str = flag(str(BASE_CONFIG), "a T5Config JSON, or a size `cotmi plan` knows (e.g. "
                                               "google/t5-v1_1-small): random weights of its shapes")
    stages: str = flag("0,2,3", "ZeRO stages, comma-separated (configs zero<N> in ds_configs/)")
    offload: str = flag("none", "offloading, comma-separated: none, optimizer (ZeRO-2/3), params (ZeRO-3: "
                                "optimizer and weights)")
    checkpointing: str = flag("false", "activation checkpointing: false, true, or false,true for both")
    ranks: str = flag("1,2", "world sizes, comma-separated")
    batch_size: int = flag(4, "micro-batch per rank", range=">= 1")
    input_len: int = flag(128, "encoder input tokens", range=">= 1")
    rationale_len: int = flag(128, "rationale tokens", range=">= 1")
    label_len: int = flag(8, "label tokens", range=">= 1")
    steps: int = flag(2, "training steps per rank", range=">= 1")
    seed: int = flag(0, "seed of the weights and batches", range=">= 0")
    build_only: bool = flag(False, "stop once the student exists (no engine, no steps: little memory)")
    plain_zero3: bool = flag(True, "also ZeRO-3 with the student built whole first (no zero.Init), at the largest "
                                   "world size")
    json_out: str = flag("", "also write the rows as JSON to this file")
    pretrained: str = flag("", "a saved T5 folder: load the student as `cotmi train --model FOLDER` does (at "
                               "ZeRO-3 slice by slice); 'random': random weights of --model_config's shapes, saved first")


@dataclass
class RationaleOptions:
    """`cotmi bench rationales` (benchmarks/rationale_grid.py)."""
    steps: int = flag(1000, "training steps of each run", range="> 0")
    seeds: str = flag("0,1,2", "seeds, comma-separated (the outer loop: a partial grid covers every method)")
    rationales: int = flag(100, "test examples whose rationales are scored", range="> 0")
    methods: str = flag("dss,mi-paper,mi-masked", "the methods, comma-separated")
    out: str = flag("bench-rationales", "the folder of the runs (finished runs there are reused) and table.md")
    train_args: str = flag("", "more `cotmi train` flags, e.g. \"--dataset svamp --data_root datasets\"")


@dataclass
class TeachBenchOptions:
    """`cotmi bench teach` (benchmarks/teach_bench.py)."""
    model: str = flag("", "a causal LM folder to serve; default: a tiny random one built on the fly")
    requests: int = flag(512, "chat requests per side and round", range="> 0")
    concurrency: int = flag(0, "requests in flight", range=">= 0", note="0: cotmi teach's default")
    max_tokens: int = flag(16, "most tokens per completion", range="> 0")
    rounds: int = flag(2, "rounds (each: the ceiling, then cotmi teach)", range="> 0")


# `cotmi bench <command>` -> its options (for --help)
COMMANDS = {"step": StepOptions, "loss": LossOptions, "memory": MemoryOptions, "rationales": RationaleOptions,
            "teach": TeachBenchOptions}
