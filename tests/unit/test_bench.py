"""`cotmi bench step`: its baseline is the released step (same losses and gradients as the trainer's
reference loss), its data are the trainer's, and its bad flags end in one line."""
import pytest
import torch

from benchmarks.released_step import ReleasedStep
from benchmarks.step_bench import _batches, parse_options
from cotmi_ds.config import TrainConfig
from cotmi_ds.errors import UsageError
from cotmi_ds.model.student import DistillModel
from tests.conftest import random_batch, run_cotmi, tiny_t5_config


@pytest.mark.parametrize("mode", ["mi", "dss"])
def test_released_step_computes_the_same_loss_and_gradients_as_the_trainer(mode):
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(tiny_t5_config(300))
    batch = random_batch(300)
    cfg = TrainConfig(mode=mode, loss="reference")
    ours = DistillModel(t5, cfg)(batch)
    ours["total"].backward()
    ours_grads = [p.grad.clone() for p in t5.parameters()]
    t5.zero_grad()
    released = ReleasedStep(t5, mi=mode == "mi", alpha=cfg.alpha, beta=cfg.beta, lr=1e-3, betas=(0.9, 0.999),
                            eps=1e-8, grad_clip=1.0, max_steps=10, bf16=False).loss(batch)
    released["total"].backward()
    assert set(ours) == set(released)
    for key in ours:
        torch.testing.assert_close(released[key], ours[key], rtol=1e-5, atol=1e-5)
    for g_ours, p in zip(ours_grads, t5.parameters()):
        torch.testing.assert_close(p.grad, g_ours, rtol=1e-4, atol=1e-6)


def test_released_step_updates_the_weights():
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(tiny_t5_config(300))
    before = [p.detach().clone() for p in t5.parameters()]
    step = ReleasedStep(t5, mi=True, alpha=0.5, beta=0.1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                        grad_clip=1.0, max_steps=10, bf16=True)  # autocast, as HF's --bf16
    parts = step.step(random_batch(300))
    assert torch.isfinite(parts["total"])
    assert all(p.grad is None for p in t5.parameters())  # zero_grad(set_to_none) after the step
    assert sum(not torch.equal(a, b) for a, b in zip(before, t5.parameters())) > len(before) // 2


def test_default_cpu_batches_come_from_the_trainers_data_pipeline():
    opts = parse_options({"batch_size": 4, "steps": 2})
    assert opts.precision == "fp32" and opts.input_len == 0 and not opts.gpu
    batches = _batches(opts, vocab_size=32128)
    assert len(batches) == 2
    for b in batches:
        assert b["pred_input_ids"].shape[0] == 4 and b["rationale_labels"].shape[0] == 4
        assert (b["labels"] == -100).any() or b["labels"].shape[1] > 1
        assert not torch.equal(b["pred_input_ids"][:, :3], b["expl_input_ids"][:, :3])  # the two prefixes


def test_fixed_shape_batches():
    opts = parse_options({"batch_size": 2, "input_len": 12, "rationale_len": 8, "label_len": 3, "steps": 3})
    batches = _batches(opts, vocab_size=500)
    assert len(batches) == 3
    assert batches[0]["pred_input_ids"].shape == (2, 12) and batches[0]["expl_input_ids"].shape == (2, 12)
    assert batches[0]["rationale_labels"].shape == (2, 8) and batches[0]["labels"].shape == (2, 3)
    assert int(batches[0]["pred_input_ids"].max()) < 500


@pytest.mark.parametrize("flags, message", [
    ({"stepz": 3}, "unknown flag --stepz for `cotmi bench step` (did you mean 'steps'?)"),
    ({"input_len": 8}, "--input_len, --rationale_len and --label_len go together"),
    ({"steps": "many"}, "--steps: expected int, got 'many'"),
    ({"rounds": 0}, "--rounds must be >= 1, got 0"),
    ({"mode": "standard"}, "--mode 'standard' is not one of: dss, mi"),
    ({"model_config": "/nonexistent.json"}, "--model_config /nonexistent.json: no such file"),
    ({"ds_config": "zero9"}, "--ds_config zero9: no such file, and not a name in"),
])
def test_bad_bench_flags_name_the_flag(flags, message):
    with pytest.raises(UsageError, match=None) as err:
        parse_options(flags)
    assert message in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_mode_without_a_gpu_exits_2_with_one_line(tmp_path):
    proc = run_cotmi(["bench", "step", "--gpu"], cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["cotmi: error: --gpu: no CUDA device is visible (torch.cuda.is_available() is False); "
                     "run without --gpu for the CPU comparison"], proc.stderr


def test_default_levers_are_all_but_flush_on_gpus(monkeypatch):
    """Every lever setting by default; on GPUs, which compute subnormals at full speed, not the one
    that only flushes them."""
    from benchmarks.step_bench import LEVERS

    assert parse_options({"lengths": "cqa"}).levers.split(",") == list(LEVERS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("cotmi_ds.model.compiled.compile_refusal", lambda *_: None)  # as with triton there
    assert parse_options({"gpu": True, "lengths": "cqa"}).levers.split(",") == [n for n in LEVERS if n != "flush"]
