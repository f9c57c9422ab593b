"""Memory of one training rank, estimated from the student's shapes (what `cotmi plan` adds up).

Model states (weights, gradients, AdamW moments, fp32 master weights) per DeepSpeed option:
- bf16 (the GPU case), ZeRO-2 and ZeRO-3 with or without CPU offload: DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``: GPU bytes
  per rank, host bytes per node). ZeRO-0 and ZeRO-1 (no estimator) follow the same byte accounting:
  16-bit weights and gradients whole (2 + 2 bytes per parameter), fp32 gradients whole at ZeRO-0 (the
  bf16 optimizer accumulates them there), and the 4 + 4 + 8 bytes of fp32 gradients, master weights
  and moments split over the ranks from ZeRO-1 on.
- fp32: 4-byte weights and gradients, no 16-bit copies; DeepSpeed's ZeRO-1/2 optimizer still keeps
  an fp32 partition of the weights beside them. On CPU ranks, where the plan is checked against
  measured peaks, bytes per parameter and per-rank buffers fitted to them instead (offloaded states
  included: they stay in the rank's process).
- ZeRO-3 also holds the weights it has gathered: up to ``stage3_max_live_parameters`` of them stay
  gathered between uses (the estimators count only the largest layer).

Activations: what autograd keeps of the two task passes (the encoder on both inputs, one decoder
pass per target), per layer from the T5 block's tensors, with or without activation checkpointing
(then each block keeps its input, and one block's activations are recomputed at a time). The loss:
the fused loss's chunk buffer and [B, V] maxima (losses/fused.py), or the full [B, T, V] logits and
their fp32 softmaxes of the reference loss. Evaluation: greedy generation's encoder states, key/value
cache and the per-step logits it keeps for the confidences.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
GIB = 2**30
# A rank's own resident memory before any of the model: torch, transformers and DeepSpeed imported and
# the process group up (`cotmi bench memory`'s base, CPU ranks).
PROCESS_BASE = int(0.41 * GIB)


@dataclass(frozen=True)
class Shapes:
    """What the estimates need to know about a T5."""
    parameters: int          # distinct parameters (a tied head counted once)
    largest_layer: int       # parameters of the largest single module (DeepSpeed's "largest layer")
    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int
    gated: bool


def shapes_of(config, own_head: bool = False) -> Shapes:
    """Exact parameter counts of a T5Config's model, built on the meta device (no memory).
    ``own_head``: the LM head is a weight of its own, as in T5 v1.1, Flan-T5 and mT5 checkpoints
    (transformers builds a T5 from a config with the head tied to the embedding)."""
    import torch

    from cotmi_ds.model.family import student_class

    with torch.device("meta"):
        t5 = student_class(config)(config)
    distinct = {id(p): p.numel() for p in t5.parameters()}
    if own_head and t5.lm_head.weight is t5.shared.weight:
        distinct[-1] = t5.lm_head.weight.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in t5.modules())
    return Shapes(parameters=sum(distinct.values()), largest_layer=largest, d_model=config.d_model,
                  d_ff=config.d_ff, d_kv=config.d_kv, num_heads=config.num_heads,
                  num_layers=config.num_layers, num_decoder_layers=config.num_decoder_layers,
                  vocab_size=config.vocab_size, gated=bool(getattr(config, "is_gated_act", True)))


@dataclass(frozen=True)
class ZeroOption:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def name(self) -> str:
        offload = ("optimizer+params" if self.offload_params else "optimizer") if self.offload_optimizer else ""
        return f"ZeRO-{self.stage}" + (f" + offload {offload}" if offload else "")


# From the cheapest to run to the most frugal: offloading moves the optimizer step to the CPUs.
ZERO_OPTIONS = (ZeroOption(0), ZeroOption(1), ZeroOption(2), ZeroOption(3), ZeroOption(2, True),
                ZeroOption(3, True), ZeroOption(3, True, True))


# fp32 on CPU ranks, per option: bytes per parameter a rank holds whole, split over the ranks, and only
# when there are several (ZeRO-0's all-reduce buffers); then MiB per rank whatever the size, and MiB per
# rank only when there are several. Fitted (least squares on the relative error) to `cotmi bench
# memory`'s training peaks of t5-v1_1-small's shapes (60.5M parameters) and a quarter of its width
# (6.5M) on 1, 2 and 4 ranks, with and without activation checkpointing (docs/scale.md#how-close-it-is).
# Above the byte accounting: DeepSpeed keeps flat fp32 copies of the weights and gradients beside its
# partitions (at ZeRO-3 on gloo, gathered ones), and on CPUs the offloaded optimizer (and weights) stay
# in the rank's own process. The per-rank MiB are buffers sized by the DeepSpeed config, not the model,
# such as its gradient buckets (2**23 fp32 elements each at the trainer's floor, ds_configs/fill.py:
# 32 MiB; with several ranks ZeRO-1/2 hold about two); at 6.5M parameters they are a third of a
# ZeRO-3 rank's peak, which bytes per parameter alone missed by 40%.
CPU_FP32 = {ZeroOption(0): (16.8, 0, 2.6, 36, 0), ZeroOption(1): (7.8, 17.7, 0, 79, 61),
            ZeroOption(2): (5.8, 18.8, 0, 88, 60), ZeroOption(3): (9.9, 16.7, 4.6, 169, 9),
            ZeroOption(2, True): (10.5, 20.6, 0, 111, 40), ZeroOption(3, True): (16.5, 13.7, 1.0, 161, 20),
            ZeroOption(3, True, True): (16.3, 13.7, 1.8, 162, 5)}


def model_states(shapes: Shapes, option: ZeroOption, gpus_per_node: int, nodes: int, precision: str,
                 device: str = "cuda", max_live_parameters: int = 10**9) -> tuple[int, int]:
    """(bytes per GPU, or per CPU rank, and host bytes per node) of weights, gradients and optimizer
    state."""
    from cotmi_ds.distributed import settle_ds_accelerator

    settle_ds_accelerator()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P, N = shapes.parameters, gpus_per_node * nodes
    live = min(P, max_live_parameters)
    # Host memory while the ranks load the model: each holds a whole fp32 copy unless built
    # partitioned (ZeRO-3 builds under zero.Init); DeepSpeed's factor 1.5 for buffers.
    load_host = int(P * 4 * gpus_per_node * 1.5)
    if device == "cpu" and precision == "fp32":
        whole, split, several, fixed_mib, several_mib = CPU_FP32[option]
        if N > 1:
            whole, fixed_mib = whole + several, fixed_mib + several_mib
        return int(P * (whole + split / N) + fixed_mib * MIB), load_host
    if option.stage == 3:
        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            P, shapes.largest_layer, gpus_per_node, nodes, cpu_offload=option.offload_optimizer,
            cpu_offload_params=option.offload_params, zero_init=True)
        if precision == "fp32" and not option.offload_optimizer:
            gpu = int(4 * shapes.largest_layer + 20 * P / N)  # 4-byte weights, gradients
        return gpu + (0 if option.offload_params else live * _bytes(precision)), host
    if option.stage == 2:
        host, gpu = estimate_zero2_model_states_mem_needs(P, gpus_per_node, nodes,
                                                          cpu_offload=option.offload_optimizer)
        if precision == "fp32":
            gpu = 4 * P if option.offload_optimizer else int(4 * P + 16 * P / N)
        return gpu, host
    if precision == "fp32":
        gpu = 16 * P if option.stage == 0 else int(8 * P + 16 * P / N)
    else:
        gpu = 8 * P + int(12 * P / N) if option.stage == 0 else 4 * P + int(16 * P / N)
    return gpu, load_host


def _bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


# Elements autograd keeps for the backward, per unit of each term, fitted (least squares, mean error
# 1.2% over 60 shapes) to what one forward of the trainer's step saves (saved_tensors_hooks, distinct
# storages; lean layers, fused loss, encoder once, transformers' SDPA attention, fp32 on CPUs):
# per encoder token and layer (d_model, heads x d_kv, d_ff, then per head and key), per decoder token
# and layer (the same; self-attention keys; cross-attention keeps no scores), the cross-attention's
# keys and values per encoder token, layer and target, and the final norms per token.
ENCODER = {"h": 4.15, "i": 2.61, "f": 3.74, "scores": 1.15}
DECODER = {"h": 4.42, "i": 6.39, "f": 5.12, "scores": 1.29, "cross_kv": 2.61}
FINAL_NORM = {"encoder": 2.63, "decoder": 4.58}
# With activation checkpointing: what stays per block (its input; a decoder block also its share of
# the encoder states) and per final norm, fitted the same way.
CHECKPOINTED = {"encoder": 1.05, "decoder": 1.58, "cross_kv": 1.12, "final": 1.12}
LOSS_KEPT_PER_ROW_TOKEN = 59  # bytes (fp32 whatever the precision: the fused loss accumulates in fp32)


def activations(shapes: Shapes, batch: int, input_len: int, label_len: int, rationale_len: int,
                precision: str, checkpointing: bool, rationale_pass: bool = True, device: str = "cuda") -> int:
    """Bytes autograd keeps between the forward and the backward of one micro-batch (both tasks):
    every block's saved tensors, or with checkpointing the blocks' inputs plus one block recomputed."""
    e = _bytes(precision)
    h, f, a, i = shapes.d_model, shapes.d_ff, shapes.num_heads, shapes.num_heads * shapes.d_kv
    passes = 2 if rationale_pass else 1
    targets = [label_len] + ([rationale_len] if rationale_pass else [])
    enc_tokens = passes * batch * input_len  # one encoder call on both prefixed inputs
    dec_tokens = [batch * t for t in targets]

    enc_layer = enc_tokens * (ENCODER["h"] * h + ENCODER["i"] * i + ENCODER["f"] * f
                              + ENCODER["scores"] * a * input_len)
    dec_layers = [n * (DECODER["h"] * h + DECODER["i"] * i + DECODER["f"] * f + DECODER["scores"] * a * t)
                  + DECODER["cross_kv"] * batch * input_len * i for n, t in zip(dec_tokens, targets)]
    final = FINAL_NORM["encoder"] * enc_tokens * h + FINAL_NORM["decoder"] * sum(dec_tokens) * h
    if not checkpointing:
        kept = shapes.num_layers * enc_layer + shapes.num_decoder_layers * sum(dec_layers) + final
    else:
        kept = (CHECKPOINTED["encoder"] * shapes.num_layers * enc_tokens * h
                + shapes.num_decoder_layers * (CHECKPOINTED["decoder"] * sum(dec_tokens) * h
                                               + CHECKPOINTED["cross_kv"] * len(targets) * batch * input_len * h)
                + CHECKPOINTED["final"] * (enc_tokens + sum(dec_tokens)) * h
                + max([enc_layer, *dec_layers]))  # the block being recomputed
    return int(kept * e)


def loss_buffer(shapes: Shapes, batch: int, label_len: int, rationale_len: int, precision: str, loss: str,
                chunk_mib: float, device: str) -> int:
    """Bytes of the loss's own buffers for one micro-batch."""
    from cotmi_ds.losses.fused import DEFAULT_CHUNK_MIB

    V = shapes.vocab_size
    if loss == "fused":
        chunk = max((chunk_mib or DEFAULT_CHUNK_MIB[device]) * MIB, batch * V * 4)  # >= one position
        passes = 2 if rationale_len else 1
        # what the loss keeps per [B, V] for its backward (the maxima, their positions, the MI's
        # distributions), measured as the activations were: 59 bytes per row and token of a pass
        kept = batch * V * LOSS_KEPT_PER_ROW_TOKEN * passes
        head_grad = V * shapes.d_model * 4  # dW accumulated in fp32
        return int(chunk + kept + head_grad)
    e = _bytes(precision)
    positions = batch * (label_len + rationale_len)
    # logits, their fp32 copy (bf16), CE's log-softmax, the gradient; the MI's rationale softmax
    return positions * V * (e + (4 if e < 4 else 0) + 4 + 4) + batch * rationale_len * V * 4


def generation(shapes: Shapes, batch: int, input_len: int, new_tokens: int, precision: str) -> int:
    """Bytes of one greedy generate() call: encoder states, key/value caches (self and cross
    attention) and the fp32 logits of every step (kept for the confidences)."""
    e = _bytes(precision)
    i = shapes.num_heads * shapes.d_kv
    cache = shapes.num_decoder_layers * 2 * batch * (new_tokens + input_len) * i * e
    encoder = batch * input_len * (shapes.d_model * e + shapes.num_heads * input_len * (4 + e))
    return cache + encoder + batch * new_tokens * shapes.vocab_size * 4
