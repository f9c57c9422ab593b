"""FLOPs of a training step of the T5 student, and the peak FLOP/s table that turns them into MFU.

The count is the model's own arithmetic (what MFU means: recomputation and optimizer excluded),
for the actual padded batch shapes. For one task's pass over a batch of B sequences, with encoder
length S, decoder length T, d = d_model, i = num_heads * d_kv, f = d_ff, n_ff = 3 weight matrices
for gated FFNs (T5 v1.1, Flan-T5) or 2 (T5 v1.0), V = vocab_size, a multiply-add counting as 2:

    encoder layer:  2BS·4di  (q, k, v, o)        + 2·2BHS²·d_kv  (scores, weights·values)
                  + 2BS·n_ff·df                  (feed-forward)
    decoder layer:  2BT·4di  + 2·2BHT²·d_kv      (self-attention)
                  + 2BT·2di  + 2BS·2di           (cross-attention: q, o on the decoder side;
                  + 2·2BHTS·d_kv                  k, v recomputed from the encoder output per layer)
                  + 2BT·n_ff·df                  (feed-forward)
    LM head:        2BT·dV

A step runs the label pass and, in modes with rationales, the rationale pass; backward costs twice
the forward (a gradient for the input and one for the weight of every matmul), so a step is
3 × the forward. Norms, softmaxes, the loss and embeddings are left out (well under 1% at these
sizes). tests/unit/test_flops.py checks the formula against torch.utils.flop_counter.
"""
from __future__ import annotations

import re

import torch

# Dense (no structured sparsity) peak tensor-core FLOP/s from the vendors' data sheets, per
# precision: bf16, tf32 (fp32 matmuls when torch allows TF32) and plain fp32.
# Sources: NVIDIA A100 Tensor Core GPU datasheet (2021); NVIDIA H100 Tensor Core GPU datasheet
# (SXM, PCIe and NVL columns; the sheet's bf16/tf32 figures are with sparsity, halved here);
# NVIDIA H200 Tensor Core GPU datasheet (same halving); NVIDIA L40S, L40, L4, A40 and A10
# datasheets; NVIDIA V100 datasheet (no bf16); NVIDIA Ada Lovelace architecture whitepaper
# v2.1, appendix table for the GeForce RTX 4090 (FP16/BF16 tensor with FP32 accumulate);
# AMD Instinct MI300X and MI250X data sheets (matrix cores).
# Patterns are matched in order against torch.cuda.get_device_name(); the first match wins.
TFLOPS = 1e12
PEAK_FLOPS: list[tuple[str, str, dict[str, float]]] = [
    # pattern (regex), name,           peak FLOP/s by precision
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"\bH100\b", "H100 SXM", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"\bG?H200\b", "H200 SXM", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (r"\bA100\b", "A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bL40S\b", "L40S", {"bf16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL40\b", "L40", {"bf16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", "L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA40\b", "A40", {"bf16": 149.7e12, "tf32": 74.8e12, "fp32": 37.4e12}),
    (r"\bA10\b", "A10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe", {"fp32": 14e12}),
    (r"\bV100\b", "V100 SXM2", {"fp32": 15.7e12}),
    (r"\bRTX 4090\b", "GeForce RTX 4090", {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"\bMI300X\b", "Instinct MI300X", {"bf16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12}),
    (r"\bMI250X\b", "Instinct MI250X", {"bf16": 383e12, "fp32": 95.7e12}),
]


def t5_forward_flops(config, batch_size: int, enc_len: int, dec_len: int) -> int:
    """Matmul FLOPs of one T5 forward over [batch_size, enc_len] inputs and [batch_size, dec_len]
    decoder positions (the formula in the module docstring)."""
    B, S, T = batch_size, enc_len, dec_len
    d, f, H, dk, V = config.d_model, config.d_ff, config.num_heads, config.d_kv, config.vocab_size
    i = H * dk
    n_ff = 3 if config.is_gated_act else 2
    n_dec = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
    enc_layer = 2 * B * S * 4 * d * i + 2 * 2 * B * H * S * S * dk + 2 * B * S * n_ff * d * f
    dec_layer = (2 * B * T * 4 * d * i + 2 * 2 * B * H * T * T * dk
                 + 2 * B * T * 2 * d * i + 2 * B * S * 2 * d * i + 2 * 2 * B * H * T * S * dk
                 + 2 * B * T * n_ff * d * f)
    return config.num_layers * enc_layer + n_dec * dec_layer + 2 * B * T * d * V


def train_step_flops(config, batch: dict[str, torch.Tensor]) -> int:
    """Forward + backward (3 × forward) FLOPs of one micro-step on a two-task ``batch`` (collate's
    keys), for its padded shapes; the rationale pass counts when the batch carries it."""
    forward = t5_forward_flops(config, *batch["pred_input_ids"].shape, batch["labels"].shape[1])
    if "expl_input_ids" in batch:
        forward += t5_forward_flops(config, *batch["expl_input_ids"].shape, batch["rationale_labels"].shape[1])
    return 3 * forward


def matmul_precision(precision: str) -> str:
    """The precision the matmuls actually run in: fp32 becomes tf32 when torch allows it."""
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return precision


def peak_flops_per_s(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak dense FLOP/s of one device at ``precision``, its name) or (None, why MFU can't be
    computed)."""
    if device.type != "cuda":
        return None, f"no peak FLOP/s for a {device.type} device (the table in cotmi_ds/model/flops.py lists GPUs)"
    name = torch.cuda.get_device_name(device)
    return lookup_peak(name, matmul_precision(precision))


def lookup_peak(device_name: str, precision: str) -> tuple[float | None, str]:
    for pattern, short, peaks in PEAK_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if precision not in peaks:
                return None, f"{short} has no {precision} tensor-core peak in cotmi_ds/model/flops.py"
            return peaks[precision], f"{short} {precision}: {peaks[precision] / TFLOPS:g} TFLOP/s peak"
    return None, f"{device_name!r} is not in the peak FLOP/s table of cotmi_ds/model/flops.py"
