"""Config resolution: defaults <- file/preset <- flags, and one clear error for each bad input."""
import json

import pytest

from cotmi_ds.config import TrainConfig, UsageError, load_config
from cotmi_ds.cli import _drop_launcher_args


def test_defaults_are_the_demo():
    cfg = load_config()
    assert (cfg.mode, cfg.dataset, cfg.model) == ("mi", "synthetic", "scratch")
    assert cfg == TrainConfig().validate()


def test_file_then_flags_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 5.0e-5\nbatch_size: 16\nmode: dss\n")
    cfg = load_config(str(f), batch_size=4)
    assert (cfg.lr, cfg.batch_size, cfg.mode) == (5e-5, 4, "dss")
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"alpha": 0.25, "max_steps": 7}))
    assert (load_config(str(j)).alpha, load_config(str(j)).max_steps) == (0.25, 7)


def test_preset_by_name():
    cfg = load_config("paper")
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.max_steps) == ("google/t5-v1_1-base", 5e-5, 64, 10000)


def test_values_are_coerced_from_strings():
    cfg = load_config(lr="1e-4", max_steps="20", overwrite="true", tokenizer="none")
    assert (cfg.lr, cfg.max_steps, cfg.overwrite, cfg.tokenizer) == (1e-4, 20, True, None)


@pytest.mark.parametrize("flags, message", [
    ({"lrr": 1}, "unknown flag --lrr (did you mean 'lr'?)"),
    ({"mode": "mmi"}, "--mode 'mmi' is not one of: standard, distill, single, dss, mi"),
    ({"precision": "fp8"}, "--precision 'fp8' is not one of"),
    ({"lr": "fast"}, "--lr: expected float, got 'fast'"),
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
