"""`cotmi plan`: the memory arithmetic (model/memory.py) and the recommendation (cluster/plan.py)."""
import json
from pathlib import Path

import pytest

from cotmi_ds.cluster.plan import (GIB, PlanInputs, batch, check_inputs, estimate, host_memory, recommend, render,
                                   student_config)
from cotmi_ds.errors import UsageError
from cotmi_ds.model import memory
from cotmi_ds.model.memory import ZeroOption
from tests.conftest import run_cotmi, tiny_t5_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def xl():
    config, source, own_head = student_config("google/t5-v1_1-xl")
    assert own_head  # as published: an LM head of its own
    return memory.shapes_of(config, own_head), source


def test_meta_count_is_the_real_models_count():
    from transformers import T5ForConditionalGeneration

    config = tiny_t5_config(96)
    t5 = T5ForConditionalGeneration(config)
    shapes = memory.shapes_of(config)
    assert shapes.parameters == sum({id(p): p.numel() for p in t5.parameters()}.values())
    assert shapes.largest_layer == 96 * 32  # the embedding


def test_built_in_table_matches_the_benchmarks_base_config():
    from transformers import T5Config

    table, source, _ = student_config("google/t5-v1_1-base")
    assert "built-in table" in source
    data = json.loads((REPO / "benchmarks" / "t5-v1_1-base.json").read_text())
    from_file = T5Config(**{k: v for k, v in data.items() if not k.startswith("_")})
    assert memory.shapes_of(table) == memory.shapes_of(from_file)


def test_xxl_has_about_eleven_billion_parameters():
    config, _, own_head = student_config("google/flan-t5-xxl")
    assert 11.1e9 < memory.shapes_of(config, own_head).parameters < 11.2e9  # 11,135,332,352 with its head


def test_mt5_names_have_the_mt5_vocabulary_and_class():
    config, source, own_head = student_config("google/mt5-base")
    assert config.model_type == "mt5" and config.vocab_size == 250112 and own_head
    assert memory.shapes_of(config, own_head).parameters == 582_401_280  # google/mt5-base's model card: 580M


def test_zero_stages_order_memory_and_zero3_loads_without_full_copies(xl):
    shapes, _ = xl
    states = {o: memory.model_states(shapes, o, 8, 1, "bf16") for o in memory.ZERO_OPTIONS}
    gpu = [states[ZeroOption(s)][0] for s in range(4)]
    assert gpu == sorted(gpu, reverse=True) and gpu[0] > 2 * gpu[3]
    assert states[ZeroOption(3, True, True)][0] < states[ZeroOption(3, True)][0] < gpu[3]
    # Host memory while loading: a whole fp32 copy per rank at ZeRO 0-2, a layer at ZeRO-3.
    assert states[ZeroOption(2)][1] > 8 * 4 * shapes.parameters > 20 * states[ZeroOption(3)][1]


def test_zero2_bf16_is_deepspeeds_estimate(xl):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shapes, _ = xl
    cpu, gpu = estimate_zero2_model_states_mem_needs(shapes.parameters, 8, 2, cpu_offload=False)
    assert memory.model_states(shapes, ZeroOption(2), 8, 2, "bf16") == (gpu, cpu)


def test_checkpointing_cuts_activations_and_they_grow_with_the_batch(xl):
    shapes, _ = xl
    full = memory.activations(shapes, 8, 512, 16, 256, "bf16", checkpointing=False)
    ckpt = memory.activations(shapes, 8, 512, 16, 256, "bf16", checkpointing=True)
    assert ckpt < full / 5
    assert memory.activations(shapes, 16, 512, 16, 256, "bf16", False) == pytest.approx(2 * full, abs=2)
    assert memory.activations(shapes, 8, 512, 16, 0, "bf16", False, rationale_pass=False) < full / 1.5


def test_fused_loss_buffer_is_far_below_full_logits(xl):
    shapes, _ = xl
    fused = memory.loss_buffer(shapes, 32, 16, 256, "bf16", "fused", 0, "cuda")
    reference = memory.loss_buffer(shapes, 32, 16, 256, "bf16", "reference", 0, "cuda")
    assert reference > 6 * fused  # (bench loss measured 0.12x at t5-base shapes, B 8)
    assert fused >= 256 * 2**20  # the GPU chunk


BIG_HOST = 10**6 * GIB


def test_recommends_the_cheapest_that_fits(xl):
    shapes, _ = xl
    big = PlanInputs(model="x", gpu_memory_gib=100_000)
    row, b, accum = recommend(big, shapes, BIG_HOST)
    assert (row.option, row.checkpointing, b, accum) == (ZeroOption(0), False, 8, 1)  # 64 over 8 GPUs
    small = PlanInputs(model="x", gpu_memory_gib=40)
    row, b, accum = recommend(small, shapes, BIG_HOST)
    rows = estimate(small, shapes)
    assert row.need <= 40 * GIB * 0.9
    assert all(r.need > 40 * GIB * 0.9 for r in rows[:rows.index(row)])  # nothing cheaper fits


def test_the_global_batch_starts_from_the_paper_preset():
    from cotmi_ds.config import read_config_file

    paper = read_config_file("paper")[0]["global_batch_size"]
    default, given = batch(PlanInputs(model="x", gpus_per_node=8)), batch(PlanInputs(model="x", global_batch_size=paper))
    assert (default.global_batch_size, default.batch_size) == (given.global_batch_size, given.batch_size) == (paper, 8)
    b = batch(PlanInputs(model="x", nodes=2, gpus_per_node=8))
    assert (b.global_batch_size, b.batch_size, b.grad_accum, b.source) == (paper, paper // 16, 1, "the paper preset's")
    b = batch(PlanInputs(model="x", gpus_per_node=4, global_batch_size=96, batch_size=8))
    assert (b.batch_size, b.grad_accum) == (8, 3)  # at most --batch_size per micro-batch, the rest accumulated
    with pytest.raises(UsageError, match="--global_batch_size 64 is not divisible by the 48 ranks"):
        check_inputs(PlanInputs(model="google/t5-v1_1-xl", nodes=6))


def test_host_memory_comes_from_the_flag_the_slurm_job_or_this_machine():
    given = PlanInputs(model="x", host_memory_gib=64)
    assert host_memory(given, {}) == (64 * GIB, "--host_memory_gib")
    p = PlanInputs(model="x")
    job = {"SLURM_JOB_ID": "7", "SLURM_MEM_PER_NODE": "96000"}
    assert host_memory(p, job) == (96000 * 2**20, "this Slurm job's allocation on this node (SLURM_MEM_PER_NODE)")
    job = {"SLURM_JOB_ID": "7", "SLURM_MEM_PER_CPU": "4000", "SLURM_CPUS_ON_NODE": "8"}
    assert host_memory(p, job)[0] == 8 * 4000 * 2**20
    machine, source = host_memory(p, {"SLURM_MEM_PER_NODE": "1"})  # not inside a job: this machine's
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    assert source.startswith("this machine's memory") and 0 < machine <= total


def test_host_memory_rules_out_whole_copies_per_rank(xl):
    shapes, _ = xl
    row, _, _ = recommend(PlanInputs(model="x", gpu_memory_gib=100_000), shapes, 64 * GIB)
    assert row.option.stage == 3 and row.host <= 64 * GIB


def test_xxl_on_a_small_host_never_recommends_what_the_node_cannot_hold():
    config, source, own_head = student_config("google/t5-v1_1-xxl")
    shapes = memory.shapes_of(config, own_head)
    p = PlanInputs(model="google/t5-v1_1-xxl", gpu_memory_gib=80)
    text = render(p, config, source, shapes, (24 * GIB, "this machine's memory"))
    assert "host memory 24.0 GiB per node (this machine's memory; fits when <= 21.6 GiB)" in text
    assert "batch: 64 examples per step (the paper preset's) = micro-batch 8 x 1 accumulation step(s) x 8 GPU(s)" in text
    row, b, accum = recommend(p, shapes, 24 * GIB)
    assert row.option.stage == 3 and not row.option.offload_optimizer  # whole copies per rank do not fit
    assert b * accum * 8 == 64
    assert "--global_batch_size 64" in text.splitlines()[-1]


def test_smaller_micro_batch_with_accumulation_when_nothing_fits(xl):
    shapes, _ = xl
    row, b, accum = recommend(PlanInputs(model="x", gpu_memory_gib=8, global_batch_size=512, eval_batch_size=8),
                              shapes, BIG_HOST)
    assert row is not None and b < 64 and b * accum == 64
    text = render(PlanInputs(model="x", gpu_memory_gib=1, global_batch_size=24), None, "test", shapes,
                  (BIG_HOST, "test"))
    assert "nothing fits" in text


def test_render_names_the_global_batch_and_flags(xl):
    shapes, source = xl
    text = render(PlanInputs(model="google/t5-v1_1-xl", nodes=2, gpus_per_node=8, gpu_memory_gib=80), None,
                  source, shapes, (BIG_HOST, "test"))
    assert "built-in table" in text and "| ZeRO-3 + offload optimizer+params | yes |" in text
    assert "global batch" in text and "cotmi train ... --global_batch_size 64 --batch_size" in text


@pytest.mark.parametrize("flags, message", [
    (dict(nodes=0), "--nodes must be >= 1, got 0"),
    (dict(gpu_memory_gib=0), "--gpu_memory_gib must be > 0"),
    (dict(precision="fp16"), "--precision 'fp16' is not one of: bf16, fp32"),
    (dict(model="./nowhere"), "--model ./nowhere: no such file or folder"),
])
def test_bad_inputs_are_one_line(flags, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_inputs(PlanInputs(**{"model": "google/t5-v1_1-xl", **flags}))


def test_cli_unknown_flag_exits_2(tmp_path):
    proc = run_cotmi(["plan", "--model", "google/t5-v1_1-xl", "--gpus", "8"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "unknown flag --gpus for `cotmi plan` (did you mean 'nodes'?)" in proc.stderr.splitlines()[-1] or \
        "unknown flag --gpus for `cotmi plan`" in proc.stderr.splitlines()[-1]


def _saved_bytes(t5, batch, cfg) -> int:
    """Distinct storages one forward of DistillModel hands autograd (not the weights)."""
    import torch

    from cotmi_ds.model.student import DistillModel

    model = DistillModel(t5, cfg)
    weights = {p.untyped_storage().data_ptr() for p in t5.parameters()}
    seen, alive = {}, []

    def pack(t):
        alive.append(t)  # kept alive, so that no storage is reused and counted twice
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        model(batch)
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["mi", "standard"])
def test_the_activation_model_is_what_autograd_keeps(mode):
    """At shapes the coefficients were not fitted on, the formula is within 8% of the bytes the
    trainer's forward (lean layers, fused loss, encoder once) hands to autograd; with checkpointing,
    of the blocks' inputs plus one block."""
    import torch
    from transformers import T5ForConditionalGeneration

    from cotmi_ds.config import load_config

    B, T_in, T_lab, T_rat = 3, 24, 6, 40
    config = tiny_t5_config(700, d_model=96, d_ff=192, d_kv=24, num_heads=3, num_layers=3, num_decoder_layers=3)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(config).train()
    g = torch.Generator().manual_seed(0)
    batch = {"pred_input_ids": torch.randint(2, 700, (B, T_in), generator=g), "labels": torch.randint(2, 700, (B, T_lab), generator=g),
             "expl_input_ids": torch.randint(2, 700, (B, T_in), generator=g), "rationale_labels": torch.randint(2, 700, (B, T_rat), generator=g),
             "pred_attention_mask": torch.ones(B, T_in, dtype=torch.long), "expl_attention_mask": torch.ones(B, T_in, dtype=torch.long)}
    shapes = memory.shapes_of(config)
    rationale = mode == "mi"
    loss_kept = B * 700 * memory.LOSS_KEPT_PER_ROW_TOKEN * (2 if rationale else 1)
    full = _saved_bytes(t5, batch, load_config(mode=mode))
    predicted = memory.activations(shapes, B, T_in, T_lab, T_rat, "fp32", False, rationale) + loss_kept
    assert predicted == pytest.approx(full, rel=0.08)
    kept = _saved_bytes(t5, batch, load_config(mode=mode, gradient_checkpointing=True))
    with_checkpointing = memory.activations(shapes, B, T_in, T_lab, T_rat, "fp32", True, rationale) + loss_kept
    assert kept < with_checkpointing < kept + full / 3 < full / 2  # inputs kept, plus one of 3+3 blocks
