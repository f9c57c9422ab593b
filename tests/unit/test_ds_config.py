"""DeepSpeed configs: every "auto" filled from the CLI, conflicts and unknowns named."""
import json

import pytest
import torch

from cotmi_ds.config import UsageError, load_config
from cotmi_ds.distributed import DistEnv
from cotmi_ds.ds_configs import DS_CONFIG_DIR
from cotmi_ds.training.engine import build_ds_config, fill_ds_config, resolve_precision

ENV2 = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2, device=torch.device("cpu"))


def _leaves(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    else:
        yield node


@pytest.mark.parametrize("name", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_shipped_configs_fill_every_auto(name):
    cfg = load_config(ds_config=name, batch_size=8, grad_accum=3, lr=2e-4, grad_clip=0.5)
    ds = build_ds_config(cfg, ENV2, "bf16", hidden_size=64)
    assert "auto" not in list(_leaves(ds))
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["optimizer"]["params"]["torch_adam"] is True  # CPU: no op compile
    assert ds["zero_optimization"].get("reduce_bucket_size", 64 * 64) == 64 * 64


def test_the_five_stages_are_shipped_and_offload_moves_optimizer_and_parameters():
    names = {p.stem for p in DS_CONFIG_DIR.glob("*.json")}
    assert {"zero0", "zero1", "zero2", "zero3", "zero3_offload"} <= names
    stages = {n: json.loads((DS_CONFIG_DIR / f"{n}.json").read_text())["zero_optimization"]["stage"]
              for n in ("zero0", "zero1", "zero2", "zero3", "zero3_offload")}
    assert stages == {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
    zero = json.loads((DS_CONFIG_DIR / "zero3_offload.json").read_text())["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("raw, message", [
    ({"zero_optimisation": {"stage": 2}},
     r"x\.json: unknown key 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket": 5}},
     r"x\.json: zero_optimization\.stage3_prefetch_bucket: unknown key"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"devise": "cpu"}}},
     r"x\.json: zero_optimization\.offload_param\.devise: unknown key"),
    ({"zero_optimization": {"stage": "three"}}, r"x\.json: zero_optimization\.stage: bad value 'three'"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}},
     r"optimizer\.params\.weight_decay = 0\.1 conflicts with --weight_decay \(0\.0\)"),
    ({"checkpoint": {"load_universal": True}}, r"checkpoint\.load_universal is set by the trainer"),
])
def test_unknown_mistyped_and_conflicting_keys_are_named(raw, message):
    with pytest.raises(UsageError, match=message):
        fill_ds_config(raw, "x.json", load_config(), ENV2, "fp32", 64)


def test_universal_loading_is_switched_on_by_the_trainer():
    ds = build_ds_config(load_config(ds_config="zero3"), ENV2, "fp32", 32, load_universal=True)
    assert ds["checkpoint"] == {"load_universal": True}
    assert "checkpoint" not in build_ds_config(load_config(ds_config="zero3"), ENV2, "fp32", 32)


def test_conflicting_concrete_value_is_named():
    cfg = load_config(batch_size=8)
    raw = {"train_micro_batch_size_per_gpu": 16}
    with pytest.raises(UsageError, match=r"x\.json: train_micro_batch_size_per_gpu = 16 conflicts with --batch_size \(8\)"):
        fill_ds_config(raw, "x.json", cfg, ENV2, "fp32", 64)


def test_auto_without_a_value_is_named():
    raw = {"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}
    with pytest.raises(UsageError, match=r"zero_optimization\.sub_group_size is \"auto\" but the trainer has no value"):
        fill_ds_config(raw, "x.json", load_config(), ENV2, "fp32", 64)


def test_fp16_is_refused_with_the_reason(tmp_path):
    with pytest.raises(UsageError, match="fp16 is refused for T5 students"):
        fill_ds_config({"fp16": {"enabled": True}}, "x.json", load_config(), ENV2, "fp32", 64)
    with pytest.raises(UsageError, match="overflow fp16"):
        resolve_precision(load_config(precision="fp16"))


def test_auto_precision_is_fp32_on_cpu():
    assert resolve_precision(load_config()) == ("bf16" if torch.cuda.is_available() else "fp32")


def test_user_file_by_path_and_broken_json(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": "auto"}))
    ds = build_ds_config(load_config(ds_config=str(f), grad_clip=2.0), ENV2, "fp32", 32)
    assert ds["gradient_clipping"] == 2.0 and ds["train_batch_size"] == 32 * 2
    f.write_text('{"zero_optimization": {"stage": 1},\n}')
    with pytest.raises(UsageError, match=r"mine\.json:2: not valid JSON"):
        build_ds_config(load_config(ds_config=str(f)), ENV2, "fp32", 32)
