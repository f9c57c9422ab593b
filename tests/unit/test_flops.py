"""The FLOPs formula against torch's own FLOP counter, and the peak table behind MFU."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cotmi_ds.config import TrainConfig
from cotmi_ds.model.flops import lookup_peak, peak_flops_per_s, t5_forward_flops, train_step_flops
from cotmi_ds.model.student import DistillModel
from tests.conftest import tiny_t5_config


def _batch(B=3, pred=11, label=5, expl=13, rationale=17, vocab=1000):
    g = torch.Generator().manual_seed(0)
    batch = {"pred_input_ids": torch.randint(2, vocab, (B, pred), generator=g),
             "pred_attention_mask": torch.ones(B, pred, dtype=torch.long),
             "labels": torch.randint(2, vocab, (B, label), generator=g),
             "expl_input_ids": torch.randint(2, vocab, (B, expl), generator=g),
             "expl_attention_mask": torch.ones(B, expl, dtype=torch.long),
             "rationale_labels": torch.randint(2, vocab, (B, rationale), generator=g)}
    batch["pred_attention_mask"][0, -4:] = 0  # padding does not change the (padded-shape) count
    batch["rationale_labels"][0, -6:] = -100
    return batch


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])  # T5 v1.1 / Flan-T5, and T5 v1.0
def test_formula_matches_torch_flop_counter_for_a_training_step(ffn):
    from transformers import T5ForConditionalGeneration

    # Uneven shapes so that no term can stand in for another: 2 encoder / 3 decoder layers,
    # heads * d_kv != d_model, four different sequence lengths, vocabulary >> d_model.
    config = tiny_t5_config(1000, d_model=32, d_ff=48, d_kv=12, num_heads=4, num_layers=2,
                            num_decoder_layers=3, feed_forward_proj=ffn)
    torch.manual_seed(0)
    # The formula counts the model's FLOPs (MFU's convention), i.e. those of the plain reference
    # step, whichever loss implementation trains; the fused loss's own GEMMs differ by chunking.
    # Eager attention: the counter has no formula for the fused CPU SDPA kernel, so with the
    # default it would miss the attention matmuls (the formula would still be 2% off, not 10%).
    model = DistillModel(T5ForConditionalGeneration(config),
                         TrainConfig(mode="mi", loss="reference", attention="eager"))
    batch = _batch()
    with FlopCounterMode(display=False) as counter:
        model(batch)["total"].backward()
    measured, predicted = counter.get_total_flops(), train_step_flops(config, batch)
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)
    # In fact the formula is exact: every matmul of both passes, forward and backward, is in it.
    assert predicted == measured


def test_label_pass_only_when_the_batch_has_no_rationale():
    config = tiny_t5_config(1000)
    batch = {k: v for k, v in _batch().items() if not k.startswith(("expl", "rationale"))}
    assert train_step_flops(config, batch) == 3 * t5_forward_flops(config, 3, 11, 5)


def test_lm_head_dominates_a_tiny_model_with_the_real_vocabulary():
    config = tiny_t5_config(32128, d_model=64, d_ff=256, d_kv=16, num_heads=4)
    head = 2 * 32 * 60 * 64 * 32128
    assert head > 0.8 * t5_forward_flops(config, 32, 60, 60)


# Device names as torch.cuda.get_device_name() gives them, one per data-centre GPU of the last three
# NVIDIA generations and their variants, with the dense bf16 peak of its row in the table.
@pytest.mark.parametrize("name, expected_tflops", [
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10G", 70), ("NVIDIA A10", 125), ("NVIDIA A40", 149.7),
    ("NVIDIA L4", 121), ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05),
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H800", 989), ("NVIDIA H800 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA GH200 144G HBM3e", 989),
    ("NVIDIA B200", 2250), ("NVIDIA GB200", 2500),
    ("NVIDIA GeForce RTX 4090", 165.2), ("AMD Instinct MI300X", 1307.4), ("AMD Instinct MI250X/MI250", 383),
])
def test_peak_table_knows_each_data_centre_gpu(name, expected_tflops):
    peak, note = lookup_peak(name, "bf16")
    assert peak == pytest.approx(expected_tflops * 1e12), note
    assert "data sheet" in note or "whitepaper" in note  # its source is named


@pytest.mark.parametrize("name, precision, expected_tflops", [
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5), ("NVIDIA H100 NVL", "tf32", 418), ("NVIDIA L4", "fp32", 30.3),
    ("Tesla V100-SXM2-16GB", "fp32", 15.7), ("Tesla V100-PCIE-32GB", "fp32", 14), ("NVIDIA B200", "tf32", 1125),
])
def test_peak_table_other_precisions(name, precision, expected_tflops):
    peak, note = lookup_peak(name, precision)
    assert peak == pytest.approx(expected_tflops * 1e12), note


@pytest.mark.parametrize("name, expected_tflops", [
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", 312 / 7), ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 312 * 3 / 7),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 989 / 7), ("NVIDIA H100 80GB HBM3 MIG 7g.80gb", 989),
    ("NVIDIA H200 MIG 2g.35gb", 989 * 2 / 7),
])
def test_a_mig_slice_counts_its_share_of_the_gpu(name, expected_tflops):
    peak, note = lookup_peak(name, "bf16")
    assert peak == pytest.approx(expected_tflops * 1e12) and "MIG" in note, note


@pytest.mark.parametrize("name, precision", [
    ("Tesla V100-SXM2-16GB", "bf16"),  # V100 has no bf16
    ("NVIDIA L20", "bf16"),            # not in the table: no guess from a similar name
    ("Some Future GPU", "bf16"),
])
def test_peak_table_says_why_when_it_has_no_figure(name, precision):
    peak, note = lookup_peak(name, precision)
    assert peak is None and "cotmi_ds/model/flops.py" in note


def test_no_mfu_on_cpu():
    peak, note = peak_flops_per_s(torch.device("cpu"), "fp32")
    assert peak is None and "cpu" in note
