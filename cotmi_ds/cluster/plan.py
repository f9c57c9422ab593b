"""`cotmi plan`: memory per GPU of each DeepSpeed option for a student and a cluster, and the
cheapest configuration that fits (the arithmetic is model/memory.py)."""
from __future__ import annotations

import json
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

# Shapes of the published T5 v1.1 / Flan-T5 checkpoints (their config.json), so that a plan needs no
# hub access. Vocabulary 32,128, gated-GELU feed-forward, d_kv 64.
KNOWN_T5 = {
    "small": dict(d_model=512, d_ff=1024, num_heads=6, num_layers=8),
    "base": dict(d_model=768, d_ff=2048, num_heads=12, num_layers=12),
    "large": dict(d_model=1024, d_ff=2816, num_heads=16, num_layers=24),
    "xl": dict(d_model=2048, d_ff=5120, num_heads=32, num_layers=24),
    "xxl": dict(d_model=4096, d_ff=10240, num_heads=64, num_layers=24),
}
KNOWN_NAMES = {f"{prefix}{size}": size for size in KNOWN_T5
               for prefix in ("google/t5-v1_1-", "t5-v1_1-", "google/flan-t5-", "flan-t5-")}
BUILT_IN_NAMES = sorted(name for name in KNOWN_NAMES if name.startswith("google/"))  # (and without google/)
# ZeRO-3 keeps up to this many gathered parameters between uses (ds_configs/zero3*.json).
MAX_LIVE_PARAMETERS = 10**9
# What the trainer's DeepSpeed config names are for each option; None: zero2/zero3 plus an edit.
DS_CONFIG_NAMES = {ZeroOption(0): "zero0", ZeroOption(1): "zero1", ZeroOption(2): "zero2",
                   ZeroOption(3): "zero3", ZeroOption(3, True, True): "zero3_offload"}


@dataclass
class PlanInputs:
    model: str = flag("", "a hub name (google/t5-v1_1-{small,base,large,xl,xxl} and flan-t5 need no hub: built-in "
                          "shapes), a model folder or a T5 config JSON")
    nodes: int = flag(1, "nodes", range=">= 1")
    gpus_per_node: int = flag(8, "GPUs per node", range=">= 1")
    gpu_memory_gib: float = flag(80.0, "memory of each GPU", range="> 0")
    batch_size: int = flag(32, "micro-batch per GPU", range=">= 1")
    grad_accum: int = flag(1, "gradient accumulation steps", range=">= 1")
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
    host_memory_gib: float = flag(0.0, "host memory per node", range=">= 0", note="0: not checked")


def check_inputs(p: PlanInputs) -> PlanInputs:
    """One line per bad flag, before anything heavy is imported."""
    check_fields(p)
    if not p.model:
        raise UsageError("--model: give a hub name (e.g. google/t5-v1_1-xl), a model folder or a T5 config JSON")
    path = Path(p.model).expanduser()
    if p.model.startswith(("/", "./", "../", "~")) and not path.exists():
        raise UsageError(f"--model {p.model}: no such file or folder")
    return p


def student_config(spec: str):
    """(T5Config, where its shapes came from): a T5 config JSON, a model folder, a known T5 v1.1 /
    Flan-T5 name (built-in table, no hub access), or any hub name (needs the hub)."""
    from transformers import AutoConfig, T5Config

    path = Path(spec).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--model {spec}: not a JSON file: {e}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--model {spec}: expected a JSON object of T5Config fields")
        return T5Config(**{k: v for k, v in data.items() if not k.startswith("_")}), f"{path}"
    if spec.lower() in KNOWN_NAMES and not path.exists():
        shapes = KNOWN_T5[KNOWN_NAMES[spec.lower()]]
        config = T5Config(vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu",
                          num_decoder_layers=shapes["num_layers"], tie_word_embeddings=False, **shapes)
        return config, "built-in table of T5 v1.1 / Flan-T5 shapes (not read from the hub)"
    try:  # a name the table does not know: the hub, or the local cache when the hub cannot be reached
        config = AutoConfig.from_pretrained(resolve(spec, "--model", "config", offline_names=BUILT_IN_NAMES))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {spec}: cannot read a model config ({str(e).splitlines()[0]}); give a "
                         f"config JSON, a model folder or one of: {', '.join(BUILT_IN_NAMES)}") from None
    if config.model_type != "t5":
        raise UsageError(f"--model {spec}: is a {config.model_type!r} model; the student must be a T5")
    return config, f"{spec} (config.json)"


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
    b = batch_size or p.batch_size
    rationale_pass = mode_of(p).rationale_pass
    rows = []
    for checkpointing in (False, True):
        act = memory.activations(shapes, b, p.input_len, p.label_len, p.rationale_len, p.precision,
                                 checkpointing, rationale_pass)
        loss = memory.loss_buffer(shapes, b, p.label_len, p.rationale_len if rationale_pass else 0,
                                  p.precision, p.loss, p.loss_chunk_mib, p.device)
        gen = memory.generation(shapes, p.eval_batch_size, p.input_len, p.max_new_tokens, p.precision)
        for option in ZERO_OPTIONS:
            states, host = memory.model_states(shapes, option, p.gpus_per_node, p.nodes, p.precision,
                                               MAX_LIVE_PARAMETERS)
            rows.append(Row(option, checkpointing, states, host, act, loss, gen))
    # Checkpointing recomputes the forward (about a third more compute), offloading moves the optimizer
    # to the CPUs: options without either come first, then checkpointing, then offload.
    rows.sort(key=lambda r: (r.option.offload_optimizer, r.checkpointing, r.option.offload_params,
                             ZERO_OPTIONS.index(r.option)))
    return rows


def fits(row: Row, p: PlanInputs) -> bool:
    host_ok = not p.host_memory_gib or row.host <= p.host_memory_gib * GIB
    return host_ok and row.need <= p.gpu_memory_gib * GIB * (1 - p.headroom)


def recommend(p: PlanInputs, shapes: memory.Shapes) -> tuple[Row | None, int, int]:
    """The first row that fits at the micro-batch asked for; else at the largest smaller power-of-two
    fraction of it, with gradient accumulation keeping the global batch. (row, micro-batch, grad_accum)."""
    b, accum = p.batch_size, p.grad_accum
    while b >= 1:
        for row in estimate(p, shapes, b):
            if fits(row, p):
                return row, b, accum
        if b % 2:
            break
        b, accum = b // 2, accum * 2
    return None, p.batch_size, p.grad_accum


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def render(p: PlanInputs, config, source: str, shapes: memory.Shapes) -> str:
    gpus = p.nodes * p.gpus_per_node
    budget = p.gpu_memory_gib * (1 - p.headroom)
    lines = [f"student: {shapes.parameters:,} parameters (d_model {shapes.d_model}, "
             f"{shapes.num_layers}+{shapes.num_decoder_layers} layers, vocab {shapes.vocab_size}); "
             f"shapes from {source}",
             f"cluster: {p.nodes} node(s) x {p.gpus_per_node} GPU(s) of {p.gpu_memory_gib:g} GiB "
             f"(fits when <= {budget:.1f} GiB: {p.headroom:.0%} kept free"
             + (f"; host memory <= {p.host_memory_gib:g} GiB per node)" if p.host_memory_gib else ")"),
             f"per GPU: micro-batch {p.batch_size}, inputs {p.input_len}, labels {p.label_len}, rationales "
             f"{p.rationale_len}, mode {p.mode}, {p.precision}, loss {p.loss}; evaluation: batch "
             f"{p.eval_batch_size}, {p.max_new_tokens} new tokens",
             "",
             "| option | checkpointing | model states | activations | loss | train peak | eval peak | "
             "host / node | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in estimate(p, shapes):
        lines.append(f"| {row.option.name} | {'yes' if row.checkpointing else 'no'} | {_gib(row.states)} | "
                     f"{_gib(row.activations)} | {_gib(row.loss)} | {_gib(row.train_peak)} | "
                     f"{_gib(row.eval_peak)} | {_gib(row.host)} | {'yes' if fits(row, p) else 'no'} |")
    lines.append("\nGiB per GPU (host: per node). Model states: DeepSpeed's estimators (docs/scale.md).")
    row, b, accum = recommend(p, shapes)
    if row is None:
        lines.append("\nnothing fits, even at micro-batch 1: more GPUs, larger GPUs or a shorter "
                     "--max_input_length / --max_target_length")
        return "\n".join(lines)
    name = DS_CONFIG_NAMES.get(row.option)
    ds = (f"--ds_config {name}" if name else
          f"--ds_config <zero{row.option.stage}.json with zero_optimization.offload_optimizer "
          "{\"device\": \"cpu\"}>")
    flags = (f"--batch_size {b} --grad_accum {accum} {ds} --precision {p.precision}"
             + (" --gradient_checkpointing true" if row.checkpointing else ""))
    smaller = "" if b == p.batch_size else f" (micro-batch {p.batch_size} fits nowhere; {b} x {accum} keeps the batch)"
    lines.append(f"\nrecommended: {row.option.name}"
                 f"{', activation checkpointing' if row.checkpointing else ''}{smaller}: "
                 f"{_gib(row.need)} GiB per GPU; global batch {b} x {accum} x {gpus} GPUs = {b * accum * gpus}")
    lines.append(f"  cotmi train ... {flags}")
    return "\n".join(lines)


def plan(p: PlanInputs) -> str:
    config, source = student_config(p.model)
    return render(p, config, source, memory.shapes_of(config))
