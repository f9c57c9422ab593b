"""Checkpoint layout, completeness checks, rotation, model identity, RNG and data-position state,
the stop flag and the non-finite guard: everything about resuming that needs no DeepSpeed engine."""
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from cotmi_ds.checkpoint import rng
from cotmi_ds.checkpoint.layout import (CHECKPOINTS, FORMAT, LATEST, META, check_same_model, file_sizes,
                                        model_identity, read_checkpoint, resolve, rotate, write_latest)
from cotmi_ds.cli import main
from cotmi_ds.distributed import DistEnv
from cotmi_ds.errors import UsageError
from cotmi_ds.training.stopping import EXIT_PREEMPTED, NonFiniteGuard, StopRequest

ENV1 = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def fake_checkpoint(run, step, world_size=2):
    """A checkpoint folder as Checkpointer.save leaves it (with stand-in DeepSpeed files)."""
    root = run / CHECKPOINTS
    folder = root / f"step-{step}"
    folder.mkdir(parents=True)
    for r in range(world_size):
        (folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x" * (100 + r))
        (folder / f"rank-{r}.json").write_text("{}")
    meta = {"format": FORMAT, "step": step, "world_size": world_size, "zero_stage": 2,
            "files": file_sizes(folder)}
    (folder / META).write_text(json.dumps(meta))
    write_latest(root, folder.name)
    return folder


def test_resolve_accepts_a_run_its_checkpoints_folder_or_one_checkpoint(tmp_path):
    fake_checkpoint(tmp_path / "run", 4)
    newest = fake_checkpoint(tmp_path / "run", 8)
    assert resolve(tmp_path / "run", "--resume") == newest
    assert resolve(tmp_path / "run" / CHECKPOINTS, "--resume") == newest
    assert resolve(tmp_path / "run" / CHECKPOINTS / "step-4", "--resume").name == "step-4"
    assert read_checkpoint(newest, "--resume").step == 8


def _one_line_error(call) -> str:
    with pytest.raises(UsageError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_empty_partial_truncated_and_foreign_checkpoints_are_named(tmp_path):
    assert "no such directory" in _one_line_error(lambda: resolve(tmp_path / "nope", "--resume"))
    (tmp_path / "empty").mkdir()
    assert "is empty" in _one_line_error(lambda: resolve(tmp_path / "empty", "--resume"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    assert "no checkpoint here" in _one_line_error(lambda: resolve(tmp_path / "other", "--resume"))

    folder = fake_checkpoint(tmp_path / "run", 6)
    partial = folder.with_name("step-9.partial")
    partial.mkdir()
    (partial / "rank-0.json").write_text("{}")
    assert "unfinished save" in _one_line_error(lambda: read_checkpoint(partial, "--resume"))
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")  # truncated
    message = _one_line_error(lambda: read_checkpoint(folder, "export:"))
    assert "incomplete checkpoint: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing or truncated" in message
    (folder / META).write_text("{not json")
    assert "not valid JSON" in _one_line_error(lambda: read_checkpoint(folder, "export:"))


def test_rotation_keeps_the_newest_and_never_the_latest_target(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path / "run", step)
    root = tmp_path / "run" / CHECKPOINTS
    write_latest(root, "step-4")  # e.g. resumed from an older checkpoint
    rotate(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-4", "step-6", "step-8"]
    assert (root / LATEST).read_text() == "step-4"


def test_model_identity_tells_another_model_apart(tiny_t5, tiny_tokenizer):
    from transformers import T5ForConditionalGeneration

    from tests.conftest import tiny_t5_config

    same = model_identity(tiny_t5, tiny_tokenizer)
    other = model_identity(T5ForConditionalGeneration(tiny_t5_config(len(tiny_tokenizer), d_model=48)),
                           tiny_tokenizer)
    info = type("Info", (), {"meta": {"model": same}, "path": "ckpt"})()
    check_same_model(info, same, "--resume")
    message = _one_line_error(lambda: check_same_model(info, other, "--resume"))
    assert "from another model (T5 d_model 32" in message and "this run builds T5 d_model 48" in message


def test_rng_states_round_trip_through_json():
    state = json.loads(json.dumps(rng.capture()))
    first = (torch.rand(3), random.random(), np.random.rand())
    rng.restore(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_stop_signal_sets_a_flag_that_every_rank_agrees_on():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        request = StopRequest()
        assert not request.agreed(ENV1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.agreed(ENV1) and request.signal_name == "SIGUSR1"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert EXIT_PREEMPTED == 75


def test_screened_loss_is_the_loss_when_finite_and_poisons_every_gradient_when_not():
    """The backward of a screened NaN/inf loss makes every gradient NaN, however the loss went
    non-finite (here: only through a part without a gradient), so the optimizer skips the update;
    a finite loss and its gradients pass unchanged. Nothing is read back."""
    guard = NonFiniteGuard(max_in_a_row=2, env=ENV1)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    for extra in (0.0, float("nan"), float("inf")):
        w.grad = None
        loss = (w * w).sum() + torch.tensor(extra)  # the NaN/inf part has no gradient of its own
        screened, finite = guard.screen(loss, step=1, position=0)
        screened.backward()
        assert bool(finite) == (extra == 0.0)
        if extra == 0.0:
            assert torch.equal(screened, loss) and torch.equal(w.grad, 2 * w.detach())
        else:
            assert torch.isnan(w.grad).all()


def test_non_finite_guard_settles_skipped_updates_in_a_row():
    """Flags recorded on the device (or as bools, as DeepSpeed's ZeRO 1-3 give them) are read at
    ``settle``: each skipped update with the micro-batches whose loss was NaN/inf, counted in a row
    across settles; a good update resets the row."""
    guard = NonFiniteGuard(max_in_a_row=3, env=ENV1)
    for step, losses, skipped in ((1, (1.0, 1.0), torch.tensor(0.0)), (2, (float("nan"), 2.0), torch.tensor(1.0)),
                                  (3, (1.0, 1.0), True)):
        for position, value in enumerate(losses):
            guard.screen(torch.tensor(value), step, 2 * (step - 1) + position)
        guard.update_done(step, skipped)
    settled = guard.settle()
    assert [(s.step, s.nonfinite_losses, s.in_a_row) for s in settled] == [(2, [2], 1), (3, [], 2)]
    assert guard.settle() == []  # read once
    guard.screen(torch.tensor(float("inf")), 4, 6)
    guard.update_done(4, torch.tensor(0.0))  # a NaN/inf loss counts as a skipped update in any case
    guard.screen(torch.tensor(1.0), 5, 7)
    guard.update_done(5, False)
    assert [(s.step, s.nonfinite_losses, s.in_a_row) for s in guard.settle()] == [(4, [6], 3)]
    assert guard.in_a_row == 0


def test_cli_export_refuses_bad_checkpoints_and_occupied_targets(tmp_path, capsys):
    folder = fake_checkpoint(tmp_path / "run", 6)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (tmp_path / "empty").mkdir()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    good = fake_checkpoint(tmp_path / "good", 2)
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "out")], "no such directory"),
        ([str(tmp_path / "empty"), str(tmp_path / "out")], "the directory is empty"),
        ([str(tmp_path / "run"), str(tmp_path / "out")],
         "incomplete checkpoint: zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
        ([str(good), str(occupied)], "already exists and is not empty"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["export", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], (args, err)
        assert err[0].startswith("cotmi: error: export: ")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_world_size_changes_go_through_universal_checkpoints_stage_changes_are_refused_but_zero0_to_1_2():
    from cotmi_ds.checkpoint.checkpointer import needs_universal
    from cotmi_ds.checkpoint.layout import CheckpointInfo

    def info(world_size, stage):
        return CheckpointInfo(path="ckpt", meta={"step": 4, "world_size": world_size, "zero_stage": stage})

    assert needs_universal(info(2, 3), world_size=1, zero_stage=3)
    assert not needs_universal(info(2, 2), world_size=2, zero_stage=2)
    assert not needs_universal(info(1, 0), world_size=2, zero_stage=0)  # ZeRO-0 files are whole
    message = _one_line_error(lambda: needs_universal(info(2, 2), world_size=2, zero_stage=3))
    assert "saved at ZeRO-2, this run uses ZeRO-3" in message
    # ZeRO-0 states continue at ZeRO-1/2 through the project's conversion, on any world size
    assert needs_universal(info(1, 0), world_size=2, zero_stage=2) and needs_universal(info(2, 0), 2, 1)
    message = _one_line_error(lambda: needs_universal(info(1, 0), world_size=2, zero_stage=3))
    assert message.endswith("saved at ZeRO-0, this run uses ZeRO-3; resume with a stage-0 or ZeRO-1/2 --ds_config")
    assert "resume with a stage-2 --ds_config" in _one_line_error(lambda: needs_universal(info(2, 2), 2, 0))


@pytest.mark.parametrize("layout", ["fp32_groups", "fp32_groups_flat"])
def test_zero0_bf16_export_takes_the_fp32_masters_in_either_optimizer_layout(tmp_path, layout):
    """DeepSpeed's bf16 optimizer at ZeRO-0 saves its fp32 masters per parameter (FP16_UnfusedOptimizer,
    the one torch's AdamW gets on every device) or as one flat tensor (FP16_Optimizer, only around
    DeepSpeed's own FusedAdam: a config with "torch_adam": false; its bf16 weights are then views of
    one flat buffer); tied names share one tensor. Each name gets its own master, through a real save."""
    from cotmi_ds.checkpoint.export import _zero0_masters

    masters = [torch.randn(3, 2), torch.randn(4), torch.randn(2, 2)]  # shared (tied to head), bias, other
    flat16 = torch.cat([m.reshape(-1) for m in masters]).to(torch.bfloat16)
    if layout == "fp32_groups_flat":
        views = [v.view(m.shape) for v, m in zip(flat16.split([m.numel() for m in masters]), masters)]
        optimizer = {"fp32_groups_flat": [torch.cat([m.reshape(-1) for m in masters])]}
    else:
        views = [m.to(torch.bfloat16) for m in masters]
        optimizer = {"fp32_groups": [masters]}
    module = {"t5.shared.weight": views[0], "t5.bias": views[1], "t5.lm_head.weight": views[0], "t5.other": views[2]}
    torch.save({"module": module, "optimizer": optimizer, "buffer_names": []}, tmp_path / "states.pt")
    states = torch.load(tmp_path / "states.pt", weights_only=True)
    got = _zero0_masters(states, tmp_path)
    expected = dict(zip(["t5.shared.weight", "t5.bias", "t5.other"], masters), **{"t5.lm_head.weight": masters[0]})
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert _zero0_masters({"module": module, "optimizer": {"state": {}}}, tmp_path) is None  # fp32: no masters


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_zero0_save_in_deepspeeds_universal_layout(tmp_path, precision):
    """What ZeRO-1/2 loads when a ZeRO-0 run continues there: per distinct parameter (tied names share
    one) its fp32 weight, AdamW's moments and step, under the name DeepSpeed gives it; the optimizer's
    groups; the model states without their optimizer. Written from a real torch.save, read back."""
    from cotmi_ds.checkpoint.zero0 import MODEL_STATES, write_universal

    torch.manual_seed(0)
    masters = [torch.randn(3, 2), torch.randn(4)]  # the embedding (tied to the head), a bias
    adam = {"state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.randn_like(m), "exp_avg_sq": torch.rand_like(m)}
                      for i, m in enumerate(masters)},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0, 1]}]}
    weights = [m.to(torch.bfloat16) if precision == "bf16" else m for m in masters]
    optimizer = {"fp32_groups": [masters], "optimizer_state_dict": adam, "cur_scale": 1.0} if precision == "bf16" else adam
    module = {"t5.shared.weight": weights[0], "t5.lm_head.weight": weights[0], "t5.bias": weights[1]}
    (tmp_path / "step-4").mkdir()
    torch.save({"module": module, "buffer_names": [], "optimizer": optimizer, "ds_config": {"gradient_clipping": 1.0},
                "global_steps": 7}, tmp_path / "step-4" / MODEL_STATES)
    write_universal(tmp_path / "step-4", tmp_path / "universal")
    zero = tmp_path / "universal" / "zero"

    def load(name, key):
        value = torch.load(zero / name / f"{key}.pt", weights_only=True)
        return value["param"] if isinstance(value, dict) else value

    for name, i in (("t5.shared.weight", 0), ("t5.bias", 1)):
        assert torch.equal(load(name, "fp32"), masters[i]) and load(name, "fp32").dtype == torch.float32
        assert torch.equal(load(name, "exp_avg"), adam["state"][i]["exp_avg"])
        assert torch.equal(load(name, "exp_avg_sq"), adam["state"][i]["exp_avg_sq"])
        assert load(name, "step") == 7
    assert sorted(p.name for p in (zero / "t5.lm_head.weight").iterdir()) == ["fp32.pt"]  # the alias
    assert torch.equal(load("t5.lm_head.weight", "fp32"), masters[0])
    global_state = torch.load(zero / "optimizer_state.pt", weights_only=False)
    assert global_state["clip_grad"] == 1.0 and global_state["param_groups"][0]["lr"] == 1e-3
    states = torch.load(tmp_path / "universal" / MODEL_STATES, weights_only=True)
    assert states["optimizer"] is None and states["global_steps"] == 7
