"""`cotmi plan`: memory per GPU of each DeepSpeed option for a student and a cluster, and the
cheapest configuration that fits (the arithmetic is model/memory.py)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cotmi_ds.errors import UsageError
from cotmi_ds.flags import check_fields, flag
from cotmi_ds.losses import LOSSES
from cotmi_ds.model import memory
from cotmi_ds.model.hub import resolve
from cotmi_ds.model.memory import ZERO_OPTIONS, ZeroOption
from cotmi_ds.modes import MODES, mode_of

GIB = 2**30

# Shapes of the published T5 v1.1 / Flan-T5 / mT5 checkpoints (their config.json), so that a plan needs
# no hub access. Gated-GELU feed-forward, d_kv 64, an LM head of their own; vocabulary 32,128 (mT5:
# 250,112).
KNOWN_T5 = {
    "small": dict(d_model=512, d_ff=1024, num_heads=6, num_layers=8),
    "base": dict(d_model=768, d_ff=2048, num_heads=12, num_layers=12),
    "large": dict(d_model=1024, d_ff=2816, num_heads=16, num_layers=24),
    "xl": dict(d_model=2048, d_ff=5120, num_heads=32, num_layers=24),
    "xxl": dict(d_model=4096, d_ff=10240, num_heads=64, num_layers=24),
}
T5_PREFIXES = ("google/t5-v1_1-", "t5-v1_1-", "google/flan-t5-", "flan-t5-")
MT5_PREFIXES = ("google/mt5-", "mt5-")
KNOWN_NAMES = {f"{prefix}{size}": size for size in KNOWN_T5 for prefix in T5_PREFIXES + MT5_PREFIXES}
BUILT_IN_NAMES = sorted(name for name in KNOWN_NAMES if name.startswith("google/"))  # (and without google/)
# ZeRO-3 keeps up to this many gathered parameters between uses (ds_configs/zero3*.json).
MAX_LIVE_PARAMETERS = 10**9
# What the trainer's DeepSpeed config names are for each option; None: zero2/zero3 plus an edit.
DS_CONFIG_NAMES = {ZeroOption(0): "zero0", ZeroOption(1): "zero1", ZeroOption(2): "zero2",
                   ZeroOption(3): "zero3", ZeroOption(3, True, True): "zero3_offload"}


@dataclass
class PlanInputs:
    model: str = flag("", "a hub name (google/t5-v1_1-{small,base,large,xl,xxl}, flan-t5 and mt5 need no hub: "
                          "built-in shapes), a model folder or a T5 config JSON")
    nodes: int = flag(1, "nodes", range=">= 1")
    gpus_per_node: int = flag(8, "ranks per node: GPUs, or CPU processes with --device cpu", range=">= 1")
    gpu_memory_gib: float = flag(80.0, "memory of each GPU", range="> 0")
    global_batch_size: int = flag(0, "examples per optimizer step", range=">= 0", note="0: the paper preset's")
    batch_size: int = flag(0, "largest micro-batch per GPU", range=">= 0", note="0: the GPU's whole share")
    input_len: int = flag(512, "encoder input tokens", range=">= 1")
    label_len: int = flag(16, "label tokens", range=">= 1")
    rationale_len: int = flag(256, "rationale tokens", range=">= 1")
    eval_batch_size: int = flag(64, "examples per generate() call and GPU", range=">= 1")
    max_new_tokens: int = flag(64, "generation length cap", range=">= 1")
    precision: str = flag("bf16", "the training precision", ("bf16", "fp32"))
    loss: str = flag("fused", "the loss implementation", LOSSES)
    loss_chunk_mib: float = flag(0.0, "fused loss: MiB of fp32 logits per chunk", range=">= 0", note="0: automatic")
    mode: str = flag("mi", "the training mode", tuple(MODES))
    device: str = flag("cuda", "what the ranks run on", ("cuda", "cpu"))
    headroom: float = flag(0.1, "fraction of the GPU memory kept free", range="[0, 1)")
    host_memory_gib: float = flag(0.0, "host memory per node", range=">= 0",
                                  note="0: this machine's, or this Slurm job's allocation")


def check_inputs(p: PlanInputs) -> PlanInputs:
    """One line per bad flag, before anything heavy is imported."""
    check_fields(p)
    if not p.model:
        raise UsageError("--model: give a hub name (e.g. google/t5-v1_1-xl), a model folder or a T5 config JSON")
    path = Path(p.model).expanduser()
    if p.model.startswith(("/", "./", "../", "~")) and not path.exists():
        raise UsageError(f"--model {p.model}: no such file or folder")
    batch(p)  # the global batch divides over the GPUs
    return p


@dataclass
class Batch:
    """The global batch and how each GPU takes its share (config.resolve_global_batch's rule)."""
    global_batch_size: int
    batch_size: int       # micro-batch per GPU
    grad_accum: int = 1
    source: str = ""


def batch(p: PlanInputs) -> Batch:
    """--global_batch_size (else the paper preset's) over the GPUs: the largest micro-batch up to
    --batch_size (unset: the whole share), accumulating the rest."""
    from cotmi_ds.config import read_config_file, resolve_global_batch

    if p.global_batch_size:
        size, source = p.global_batch_size, "--global_batch_size"
    else:
        size, source = int(read_config_file("paper")[0]["global_batch_size"]), "the paper preset's"
    gpus = p.nodes * p.gpus_per_node
    resolved = resolve_global_batch(Batch(size, p.batch_size or max(1, size // gpus)), gpus)
    return dataclasses.replace(resolved, source=source)


def host_memory(p: PlanInputs, environ=os.environ) -> tuple[int, str]:
    """(bytes per node, where the figure came from): --host_memory_gib; inside a Slurm job, its
    allocation on this node; else this machine's memory (or its cgroup's limit, if lower)."""
    if p.host_memory_gib:
        return int(p.host_memory_gib * GIB), "--host_memory_gib"
    mib = 2**20
    if environ.get("SLURM_JOB_ID"):
        for key, per in (("SLURM_MEM_PER_NODE", None), ("SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE"),
                         ("SLURM_MEM_PER_GPU", "SLURM_GPUS_ON_NODE")):
            value = environ.get(key, "")
            count = environ.get(per, "") if per else "1"
            if value.isdigit() and int(value) > 0 and count.isdigit() and int(count) > 0:
                how = key if per is None else f"{key} x {per}"
                return int(value) * int(count) * mib, f"this Slurm job's allocation on this node ({how})"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    if limit.isdigit() and int(limit) < total:
        return int(limit), "this machine's memory limit (cgroup memory.max)"
    return total, "this machine's memory"


def student_config(spec: str):
    """(config, where its shapes came from, whether the LM head is a weight of its own): a T5 config
    JSON, a model folder, a known T5 v1.1 / Flan-T5 / mT5 name (built-in table, no hub access), or any
    hub name (needs the hub). The head: what the folder's weights hold; for the known names, their
    own (as published); for a config, its own where the config says it is untied (T5 v1.1-style)."""
    from transformers import AutoConfig

    from cotmi_ds.model.family import check_model_type, config_from_dict
    from cotmi_ds.model.weights import holds_own_head

    path = Path(spec).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--model {spec}: not a JSON file: {e}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--model {spec}: expected a JSON object of T5Config fields")
        untied = data.get("tie_word_embeddings") is False or data.get("model_type") == "mt5"
        return config_from_dict(data), f"{path}", untied
    if spec.lower() in KNOWN_NAMES and not path.exists():
        shapes = KNOWN_T5[KNOWN_NAMES[spec.lower()]]
        mt5 = spec.lower().startswith(MT5_PREFIXES)
        config = config_from_dict(dict(model_type="mt5" if mt5 else "t5", vocab_size=250112 if mt5 else 32128,
                                       d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                       num_decoder_layers=shapes["num_layers"], pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0, **shapes))
        return config, "built-in table of T5 v1.1 / Flan-T5 / mT5 shapes (not read from the hub)", True
    try:  # a name the table does not know: the hub, or the local cache when the hub cannot be reached
        config = AutoConfig.from_pretrained(resolve(spec, "--model", "config", offline_names=BUILT_IN_NAMES))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {spec}: cannot read a model config ({str(e).splitlines()[0]}); give a "
                         f"config JSON, a model folder or one of: {', '.join(BUILT_IN_NAMES)}") from None
    check_model_type(config.model_type, f"--model {spec}")
    own = holds_own_head(path) if path.is_dir() else None
    return config, f"{spec} (config.json)", (not getattr(config, "scale_decoder_outputs", False)) if own is None else own


@dataclass
class Row:
    option: ZeroOption
    checkpointing: bool
    states: int       # bytes per GPU
    host: int         # bytes per node
    activations: int
    loss: int
    generation: int

    @property
    def train_peak(self) -> int:
        return self.states + self.activations + self.loss

    @property
    def eval_peak(self) -> int:
        return self.states + self.generation

    @property
    def need(self) -> int:
        return max(self.train_peak, self.eval_peak)


def estimate(p: PlanInputs, shapes: memory.Shapes, batch_size: int | None = None) -> list[Row]:
    """One row per DeepSpeed option, without then with activation checkpointing, cheapest first."""
    b = batch_size or batch(p).batch_size
    rationale_pass = mode_of(p).rationale_pass
    rows = []
    for checkpointing in (False, True):
        act = memory.activations(shapes, b, p.input_len, p.label_len, p.rationale_len, p.precision,
                                 checkpointing, rationale_pass, p.device)
        loss = memory.loss_buffer(shapes, b, p.label_len, p.rationale_len if rationale_pass else 0,
                                  p.precision, p.loss, p.loss_chunk_mib, p.device)
        gen = memory.generation(shapes, p.eval_batch_size, p.input_len, p.max_new_tokens, p.precision)
        for option in ZERO_OPTIONS:
            states, host = memory.model_states(shapes, option, p.gpus_per_node, p.nodes, p.precision, p.device,
                                               MAX_LIVE_PARAMETERS)
            rows.append(Row(option, checkpointing, states, host, act, loss, gen))
    # Checkpointing recomputes the forward (about a third more compute), offloading moves the optimizer
    # to the CPUs: options without either come first, then checkpointing, then offload.
    rows.sort(key=lambda r: (r.option.offload_optimizer, r.checkpointing, r.option.offload_params,
                             ZERO_OPTIONS.index(r.option)))
    return rows


def host_need(row: Row, p: PlanInputs) -> int:
    """Host memory one node needs for this row: on GPUs the row's host figure (loading, offloaded
    states) plus each rank's process; on CPUs the ranks' whole peaks."""
    ranks = p.gpus_per_node
    if p.device == "cpu":
        return ranks * (row.need + memory.PROCESS_BASE)
    return row.host + ranks * memory.PROCESS_BASE


def fits(row: Row, p: PlanInputs, host_bytes: int) -> bool:
    """Within the node's host memory and, on GPUs, within each GPU's memory; both less the headroom."""
    keep = 1 - p.headroom
    gpu_ok = p.device == "cpu" or row.need <= p.gpu_memory_gib * GIB * keep
    return gpu_ok and host_need(row, p) <= host_bytes * keep


def recommend(p: PlanInputs, shapes: memory.Shapes, host_bytes: int) -> tuple[Row | None, int, int]:
    """The first row that fits at the micro-batch the global batch gives each GPU; else at the largest
    smaller power-of-two fraction of it, accumulating more so the global batch stays. (row,
    micro-batch, grad_accum)."""
    start = batch(p)
    b, accum = start.batch_size, start.grad_accum
    while b >= 1:
        for row in estimate(p, shapes, b):
            if fits(row, p, host_bytes):
                return row, b, accum
        if b % 2:
            break
        b, accum = b // 2, accum * 2
    return None, start.batch_size, start.grad_accum


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def render(p: PlanInputs, config, source: str, shapes: memory.Shapes, host: tuple[int, str]) -> str:
    host_bytes, host_source = host
    gpus = p.nodes * p.gpus_per_node
    keep = 1 - p.headroom
    start = batch(p)
    unit = "rank" if p.device == "cpu" else "GPU"
    where = (f"{p.nodes} node(s) x {p.gpus_per_node} CPU rank(s)" if p.device == "cpu" else
             f"{p.nodes} node(s) x {p.gpus_per_node} GPU(s) of {p.gpu_memory_gib:g} GiB (fits when <= "
             f"{p.gpu_memory_gib * keep:.1f} GiB)")
    lines = [f"student: {shapes.parameters:,} parameters (d_model {shapes.d_model}, "
             f"{shapes.num_layers}+{shapes.num_decoder_layers} layers, vocab {shapes.vocab_size}); "
             f"shapes from {source}",
             f"cluster: {where}; host memory {host_bytes / GIB:.1f} GiB per node ({host_source}; "
             f"fits when <= {host_bytes * keep / GIB:.1f} GiB); {p.headroom:.0%} of each kept free",
             f"batch: {start.global_batch_size} examples per step ({start.source}) = micro-batch "
             f"{start.batch_size} x {start.grad_accum} accumulation step(s) x {gpus} {unit}(s)",
             f"per {unit}: inputs {p.input_len}, labels {p.label_len}, rationales {p.rationale_len}, mode {p.mode}, "
             f"{p.precision}, loss {p.loss}; evaluation: batch {p.eval_batch_size}, {p.max_new_tokens} new tokens",
             "",
             f"| option | checkpointing | model states | activations | loss | train peak | eval peak | "
             "host / node | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in estimate(p, shapes):
        lines.append(f"| {row.option.name} | {'yes' if row.checkpointing else 'no'} | {_gib(row.states)} | "
                     f"{_gib(row.activations)} | {_gib(row.loss)} | {_gib(row.train_peak)} | "
                     f"{_gib(row.eval_peak)} | {_gib(host_need(row, p))} | "
                     f"{'yes' if fits(row, p, host_bytes) else 'no'} |")
    lines.append(f"\nGiB per {unit} (host: per node), at micro-batch {start.batch_size}; how they are computed "
                 "and how close they came to measured peaks: docs/scale.md.")
    row, b, accum = recommend(p, shapes, host_bytes)
    if row is None:
        lines.append(f"\nnothing fits, even at micro-batch 1: more or larger {unit}s, more host memory, or "
                     "shorter --max_input_length / --max_target_length")
        return "\n".join(lines)
    name = DS_CONFIG_NAMES.get(row.option)
    ds = (f"--ds_config {name}" if name else
          f"--ds_config <zero{row.option.stage}.json with zero_optimization.offload_optimizer "
          "{\"device\": \"cpu\"}>")
    flags = (f"--global_batch_size {start.global_batch_size} --batch_size {b} {ds} --precision {p.precision}"
             + (" --gradient_checkpointing true" if row.checkpointing else ""))
    smaller = ("" if b == start.batch_size else
               f" (micro-batch {start.batch_size} fits nowhere; {b} x {accum} keeps the batch)")
    lines.append(f"\nrecommended: {row.option.name}"
                 f"{', activation checkpointing' if row.checkpointing else ''}{smaller}: "
                 f"{_gib(row.need)} GiB per {unit}, {_gib(host_need(row, p))} GiB of host memory per node; "
                 f"global batch {b} x {accum} x {gpus} {unit}s = {b * accum * gpus}")
    lines.append(f"  cotmi train ... {flags}")
    return "\n".join(lines)


def plan(p: PlanInputs) -> str:
    config, source, own_head = student_config(p.model)
    return render(p, config, source, memory.shapes_of(config, own_head), host_memory(p))
