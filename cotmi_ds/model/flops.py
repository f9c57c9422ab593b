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

TFLOPS = 1e12
_T = TFLOPS

# Dense (no structured sparsity) peak FLOP/s of one device, per precision: bf16 and tf32 (fp32
# matmuls when torch allows TF32) on the tensor cores, plain fp32 on the CUDA cores. Data sheets
# that quote tensor figures "with sparsity" only are halved. Keyed by (model, variant) as
# ``device_model`` reads them from torch.cuda.get_device_name(); each row names its source.
PEAKS: dict[tuple[str, str], tuple[dict[str, float], str]] = {
    # Ampere
    ("A100", ""): ({"bf16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T},
                   "NVIDIA A100 Tensor Core GPU data sheet (SXM and PCIe, 40 and 80 GB)"),
    ("A10G", ""): ({"bf16": 70 * _T, "tf32": 35 * _T, "fp32": 31.52 * _T},
                   "NVIDIA A10G as specified for AWS EC2 G5 instances (NVIDIA publishes no A10G data sheet)"),
    ("A10", ""): ({"bf16": 125 * _T, "tf32": 62.5 * _T, "fp32": 31.2 * _T}, "NVIDIA A10 data sheet"),
    ("A40", ""): ({"bf16": 149.7 * _T, "tf32": 74.8 * _T, "fp32": 37.4 * _T}, "NVIDIA A40 data sheet"),
    # Ada Lovelace
    ("L4", ""): ({"bf16": 121 * _T, "tf32": 60 * _T, "fp32": 30.3 * _T}, "NVIDIA L4 data sheet"),
    ("L40S", ""): ({"bf16": 362.05 * _T, "tf32": 183 * _T, "fp32": 91.6 * _T}, "NVIDIA L40S data sheet"),
    ("L40", ""): ({"bf16": 181.05 * _T, "tf32": 90.5 * _T, "fp32": 90.5 * _T}, "NVIDIA L40 data sheet"),
    ("RTX 4090", ""): ({"bf16": 165.2 * _T, "tf32": 82.6 * _T, "fp32": 82.6 * _T},
                       "NVIDIA Ada Lovelace architecture whitepaper v2.1, GeForce RTX 4090 (FP32 accumulate)"),
    # Hopper
    ("H100", ""): ({"bf16": 989 * _T, "tf32": 494.5 * _T, "fp32": 67 * _T}, "NVIDIA H100 data sheet, SXM"),
    ("H100", "PCIE"): ({"bf16": 756 * _T, "tf32": 378 * _T, "fp32": 51 * _T}, "NVIDIA H100 data sheet, PCIe"),
    ("H100", "NVL"): ({"bf16": 835 * _T, "tf32": 418 * _T, "fp32": 60 * _T}, "NVIDIA H100 data sheet, NVL"),
    ("H800", ""): ({"bf16": 989 * _T, "tf32": 494.5 * _T, "fp32": 67 * _T}, "NVIDIA H800 data sheet, SXM"),
    ("H800", "PCIE"): ({"bf16": 756 * _T, "tf32": 378 * _T, "fp32": 51 * _T}, "NVIDIA H800 data sheet, PCIe"),
    ("H200", ""): ({"bf16": 989 * _T, "tf32": 494.5 * _T, "fp32": 67 * _T}, "NVIDIA H200 data sheet, SXM"),
    ("H200", "NVL"): ({"bf16": 835 * _T, "tf32": 418 * _T, "fp32": 60 * _T}, "NVIDIA H200 data sheet, NVL"),
    ("GH200", ""): ({"bf16": 989 * _T, "tf32": 494.5 * _T, "fp32": 67 * _T},
                    "NVIDIA GH200 Grace Hopper Superchip data sheet (its H100/H200 GPU)"),
    # Blackwell (per GPU: the system figures divided by the GPUs in it)
    ("B200", ""): ({"bf16": 2250 * _T, "tf32": 1125 * _T, "fp32": 75 * _T}, "NVIDIA HGX B200 data sheet (8 GPUs)"),
    ("GB200", ""): ({"bf16": 2500 * _T, "tf32": 1250 * _T, "fp32": 80 * _T},
                    "NVIDIA GB200 NVL72 data sheet (72 GPUs)"),
    # older and other vendors
    ("V100", ""): ({"fp32": 15.7 * _T}, "NVIDIA V100 data sheet, SXM2 (no bf16)"),
    ("V100", "PCIE"): ({"fp32": 14 * _T}, "NVIDIA V100 data sheet, PCIe (no bf16)"),
    ("MI300X", ""): ({"bf16": 1307.4 * _T, "tf32": 653.7 * _T, "fp32": 163.4 * _T},
                     "AMD Instinct MI300X data sheet (matrix cores)"),
    ("MI250X", ""): ({"bf16": 383 * _T, "fp32": 95.7 * _T}, "AMD Instinct MI250X data sheet (matrix cores)"),
}
MIG_SLICES = 7  # a GPU in MIG mode is cut into seven compute slices; profile "Ng.Mgb" holds N


def device_model(device_name: str) -> tuple[str, str, int]:
    """(model, variant, MIG compute slices or 0) from a CUDA device name such as "NVIDIA
    A100-SXM4-80GB", "NVIDIA H100 PCIe", "NVIDIA GH200 480GB" or "NVIDIA H100 80GB HBM3 MIG
    3g.40gb". Whole tokens only: an A10G is not an A10, an L40S not an L4."""
    tokens = re.findall(r"[A-Z0-9.]+", device_name.upper())
    models = {model for model, _ in PEAKS}
    model = next((t for t in tokens if t in models), "")
    if not model and "4090" in tokens:
        model = "RTX 4090"
    variant = next((t for t in tokens if (model, t) in PEAKS), "")
    mig = re.search(r"\bMIG\s+(\d)g\.", device_name, flags=re.IGNORECASE)
    return model, variant, int(mig.group(1)) if mig else 0


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
    """The device's dense peak at ``precision`` from ``PEAKS``; a MIG slice gets its share of the
    GPU's (N of 7 compute slices; on an A100 the 7 slices hold 98 of its 108 SMs, so a slice's
    share is a little generous and its MFU a little low)."""
    model, variant, slices = device_model(device_name)
    if (model, variant) not in PEAKS:
        return None, f"{device_name!r} is not in the peak FLOP/s table of cotmi_ds/model/flops.py"
    peaks, source = PEAKS[model, variant]
    name = " ".join(filter(None, [model, {"PCIE": "PCIe"}.get(variant, variant)]))
    if precision not in peaks:
        return None, f"{name} has no {precision} tensor-core peak in cotmi_ds/model/flops.py ({source})"
    peak = peaks[precision]
    if slices:
        peak *= slices / MIG_SLICES
        name += f" MIG {slices}/{MIG_SLICES} of the GPU"
    return peak, f"{name} {precision}: {peak / TFLOPS:g} TFLOP/s peak ({source})"
