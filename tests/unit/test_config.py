"""Config resolution: defaults <- file/preset <- flags, and one clear error for each bad input."""
import json

import pytest

from cotmi_ds.config import (TrainConfig, describe_batch, describe_lr, describe_settings, load_config,
                             resolve_global_batch)
from cotmi_ds.cli import _drop_launcher_args
from cotmi_ds.errors import UsageError


def test_defaults_are_the_demo():
    cfg = load_config()
    assert (cfg.mode, cfg.dataset, cfg.model) == ("mi", "synthetic", "scratch")
    assert cfg == TrainConfig().validate()


def test_the_learning_rate_defaults_by_where_the_student_comes_from(tmp_path):
    """3e-3 trains the scratch T5; a pretrained T5 (hub name or folder) gets the published 5e-5. Given
    rates win, and the saved config holds the number, so a resume or a report reads the same."""
    assert load_config().lr == TrainConfig().lr == 3e-3
    assert load_config(model="google/t5-v1_1-small").lr == 5e-5
    assert load_config(model=str(tmp_path)).lr == 5e-5
    assert load_config(model="google/t5-v1_1-small", lr="1e-4").lr == 1e-4
    assert load_config(lr="none").lr == 3e-3  # null: the student's default
    (tmp_path / "pretrained.yaml").write_text("model: google/flan-t5-base\n")
    cfg = load_config(str(tmp_path / "pretrained.yaml"))
    assert cfg.lr == 5e-5 and "lr: 5.0e-05" in cfg.to_yaml()
    assert load_config(str(tmp_path / "pretrained.yaml"), model="scratch").lr == 3e-3


def test_the_start_up_says_which_learning_rate_and_why():
    line, warning = describe_lr(load_config())
    assert line == "lr 3e-3: the default for a scratch student; a pretrained one gets 5e-5" and warning is None
    line, warning = describe_lr(load_config(model="google/t5-v1_1-small"))
    assert line.startswith("lr 5e-5: the default for a pretrained student (the published set-up's)") and not warning
    assert describe_lr(load_config(lr=1e-4))[0] == "lr 1e-4: as given (the default for a scratch student is 3e-3)"
    assert describe_settings(load_config()) == ""
    assert describe_settings(load_config(model="google/t5-v1_1-small", max_steps=5)) == \
        "--model google/t5-v1_1-small --max_steps 5"


@pytest.mark.parametrize("lr, warned", [(3e-3, "above"), (2e-3, "above"), (1e-3, None), (5e-5, None), (1e-5, None),
                                        (1e-7, "below")])
def test_a_pretrained_student_is_warned_of_a_rate_far_from_fine_tuning_rates(lr, warned):
    warning = describe_lr(load_config(model="google/t5-v1_1-small", lr=lr))[1]
    if warned is None:
        assert warning is None
    else:
        assert warning.startswith(f"--lr {lr:.0e}".replace("e-0", "e-") + " is outside the rates used to fine-tune "
                                  "a pretrained T5 (1e-5 to 1e-3)")
        assert ("wreck" in warning) == (warned == "above") and "5e-5" in warning
    assert describe_lr(load_config(lr=lr))[1] is None  # a scratch student: any rate is its own business


def test_file_then_flags_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 5.0e-5\nbatch_size: 16\nmode: dss\n")
    cfg = load_config(str(f), batch_size=4)
    assert (cfg.lr, cfg.batch_size, cfg.mode) == (5e-5, 4, "dss")
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"alpha": 0.25, "max_steps": 7}))
    assert (load_config(str(j)).alpha, load_config(str(j)).max_steps) == (0.25, 7)


def test_the_paper_preset_is_the_released_run():
    cfg = load_config("paper", dataset="svamp")
    assert (cfg.model, cfg.mode, cfg.alpha, cfg.beta) == ("google/t5-v1_1-base", "mi", 0.5, 0.1)
    # HF Trainer (transformers 4.24) defaults: AdamW without weight decay, clipping 1.0, no warm-up.
    assert (cfg.lr, cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.grad_clip,
            cfg.warmup_steps) == (5e-5, 0.0, 0.9, 0.999, 1e-8, 1.0, 0)
    assert (cfg.global_batch_size, cfg.max_steps, cfg.eval_every, cfg.precision) == (64, 10000, 250, "fp32")
    assert cfg.max_new_tokens == 63  # generation_max_length=64 counts the decoder start token
    assert not cfg.group_by_length  # the release draws rows in random order
    fast = load_config("paper-bf16", dataset="svamp")
    assert fast.precision == "bf16" and {**fast.to_dict(), "precision": "fp32"} == cfg.to_dict()


@pytest.mark.parametrize("preset", ["paper", "paper-bf16"])
def test_the_paper_presets_need_a_dataset(preset):
    with pytest.raises(UsageError, match=rf"^--config {preset} needs --dataset \(one of: synthetic, "):
        load_config(preset)


@pytest.mark.parametrize("world, cap, micro, accum", [(1, 64, 64, 1), (8, 64, 8, 1), (1, 16, 16, 4),
                                                      (1, 24, 16, 4), (2, 5, 4, 8), (64, 64, 1, 1)])
def test_the_global_batch_resolves_to_micro_batch_and_accumulation(world, cap, micro, accum, tmp_path):
    cfg = resolve_global_batch(load_config("paper", dataset="svamp", batch_size=cap), world)
    assert (cfg.batch_size, cfg.grad_accum) == (micro, accum)
    assert describe_batch(cfg, world) == (f"64 examples per optimizer step (--global_batch_size 64) = micro-batch "
                                          f"{micro} x {accum} accumulation step(s) x {world} rank(s)")
    # The resolved config, saved (config.yaml) and read back, resolves to the same on the same world size.
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert resolve_global_batch(load_config(str(tmp_path / "config.yaml")), world) == cfg


def test_a_global_batch_is_refused_when_it_cannot_be_split_or_accumulation_is_also_given():
    with pytest.raises(UsageError, match=r"^--global_batch_size 64 is not divisible by the 3 ranks"):
        resolve_global_batch(load_config(global_batch_size=64), 3)
    with pytest.raises(UsageError, match=r"^--grad_accum is derived from --global_batch_size \(64\)"):
        load_config("paper", dataset="svamp", grad_accum=2)
    unset = load_config(batch_size=8, grad_accum=3)
    assert resolve_global_batch(unset, 4) is unset


def test_a_config_file_can_extend_another(tmp_path):
    (tmp_path / "mine.yaml").write_text("extends: paper\nlr: 1.0e-4\n")
    cfg = load_config(str(tmp_path / "mine.yaml"), dataset="cqa")
    assert (cfg.lr, cfg.global_batch_size, cfg.dataset) == (1e-4, 64, "cqa")
    (tmp_path / "loop.yaml").write_text(f"extends: {tmp_path / 'loop.yaml'}\n")
    with pytest.raises(UsageError, match="loop.yaml: extends itself"):
        load_config(str(tmp_path / "loop.yaml"))


def test_a_relative_extends_is_taken_from_the_folder_of_the_file_that_names_it(tmp_path, monkeypatch):
    (tmp_path / "cfgs" / "sub").mkdir(parents=True)
    (tmp_path / "cfgs" / "base.yaml").write_text("max_steps: 3\n")
    (tmp_path / "cfgs" / "sub" / "mid.yaml").write_text("extends: ../base.yaml\nseed: 5\n")
    (tmp_path / "cfgs" / "child.yaml").write_text("extends: sub/mid.yaml\nlr: 1.0e-4\n")
    (tmp_path / "base.yaml").write_text("max_steps: 99\n")  # beside the working directory: not this one
    monkeypatch.chdir(tmp_path)
    cfg = load_config("cfgs/child.yaml")
    assert (cfg.max_steps, cfg.seed, cfg.lr) == (3, 5, 1e-4)


def test_values_are_coerced_from_strings():
    cfg = load_config(lr="1e-4", max_steps="20", overwrite="true", tokenizer="none")
    assert (cfg.lr, cfg.max_steps, cfg.overwrite, cfg.tokenizer) == (1e-4, 20, True, None)


@pytest.mark.parametrize("flags, message", [
    ({"lrr": 1}, "unknown flag --lrr (did you mean 'lr'?)"),
    ({"mode": "mmi"}, "--mode 'mmi' is not one of: standard, distill, single, dss, mi"),
    ({"precision": "fp8"}, "--precision 'fp8' is not one of"),
    ({"lr": "fast"}, "--lr: expected float or null, got 'fast'"),
    ({"max_steps": 2.5}, "--max_steps: expected int, got 2.5"),
    ({"alpha": 1.5}, "--alpha must be in [0, 1], got 1.5"),
    ({"batch_size": 0}, "--batch_size must be > 0, got 0"),
    ({"overwrite": "maybe"}, "--overwrite: expected bool, got 'maybe'"),
    ({"model": "./no/such/dir"}, "--model ./no/such/dir: no such directory"),
    ({"model": "google/t5-v1_1-small", "scratch_d_model": 8}, "the scratch_* flags only apply to --model scratch"),
    ({"warmup_steps": 10, "max_steps": 10}, "--warmup_steps (10) must be < --max_steps (10)"),
    ({"resume": "auto"}, "--resume auto needs --output_dir"),
    ({"keep_last": -1}, "--keep_last must be >= 0, got -1"),
    ({"max_bad_steps": 0}, "--max_bad_steps must be > 0, got 0"),
    ({"lr": "inf"}, "--lr must be a finite number, got inf"),
    ({"beta": "inf"}, "--beta must be a finite number, got inf"),
    ({"alpha": "nan"}, "--alpha must be a finite number, got nan"),
    ({"loss_chunk_mib": "inf"}, "--loss_chunk_mib must be a finite number, got inf"),
    ({"cpu_backward_mmap_mib": 64}, "--cpu_backward_mmap_mib must be in [0, 32] (0: glibc's own behaviour), got 64"),
    ({"loss_chunk_mib": 1e12}, "--loss_chunk_mib must be in [0, 1048576] (0: automatic), got 1000000000000.0"),
    ({"lr": "1e38"}, "--lr 1e+38 is too large: Adam's first step (lr / (1 - adam_beta1)) overflows float32"),
])
def test_bad_flags_name_what_to_fix(flags, message):
    with pytest.raises(UsageError) as e:
        load_config(**flags)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files_name_the_file_and_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-4\nbatchsize: 3\n")
    with pytest.raises(UsageError, match=r"c\.yaml: unknown key 'batchsize' \(did you mean 'batch_size'\?\)"):
        load_config(str(f))
    f.write_text("lr: [1\nmode: mi\n")
    with pytest.raises(UsageError, match=r"c\.yaml:\d+: not valid YAML"):
        load_config(str(f))
    j = tmp_path / "c.json"
    j.write_text('{"lr": 1,\n "mode": }')
    with pytest.raises(UsageError, match=r"c\.json:2: not valid JSON"):
        load_config(str(j))
    f.write_text("- lr\n")
    with pytest.raises(UsageError, match="expected a mapping"):
        load_config(str(f))
    with pytest.raises(UsageError, match="no such file or preset"):
        load_config(str(tmp_path / "missing.yaml"))
    f.write_bytes("lr: 1e-4\nmode: mi # \u00e9\n".encode("latin-1"))
    with pytest.raises(UsageError) as e:
        load_config(str(f))
    assert str(e.value) == f"{f}: not UTF-8 text (byte 0xe9 at offset 20); save it as UTF-8"


def test_launcher_local_rank_is_dropped_wherever_it_appears():
    assert _drop_launcher_args(["--local_rank=1", "train", "--lr", "1"]) == ["train", "--lr", "1"]
    assert _drop_launcher_args(["train", "--local_rank", "0", "--mode", "mi"]) == ["train", "--mode", "mi"]
