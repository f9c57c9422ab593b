"""DeepSpeed configs: every "auto" filled from the CLI, conflicts and unknowns named."""
import json

import pytest
import torch

from cotmi_ds.config import load_config
from cotmi_ds.distributed import DistEnv
from cotmi_ds.ds_configs import DS_CONFIG_DIR, DsConfig, choose_ds_config
from cotmi_ds.ds_configs.fill import REDUCE_BUCKET_FLOOR
from cotmi_ds.ds_configs.precision import resolve_precision
from cotmi_ds.errors import UsageError

CPU = torch.device("cpu")
ENV2 = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2, device=CPU)


def build(cfg, env, precision, hidden_size, **kwargs):
    """What the trainer runs for these flags: the entry point the trainer, doctor and benchmarks use."""
    return choose_ds_config(cfg.ds_config, env.world_size).fill(cfg, env, precision, hidden_size, **kwargs)


def fill(raw, cfg, env, precision, hidden_size):
    return DsConfig("x.json", raw, "x.json").fill(cfg, env, precision, hidden_size)


def _leaves(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    else:
        yield node


@pytest.mark.parametrize("name", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_shipped_configs_fill_every_auto(name):
    accum = 1 if name == "zero0" else 3  # bf16 accumulation at ZeRO-0: see the test below
    cfg = load_config(ds_config=name, batch_size=8, grad_accum=accum, lr=2e-4, grad_clip=0.5)
    ds = build(cfg, ENV2, "bf16", hidden_size=64)
    assert "auto" not in list(_leaves(ds))
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == 8 * accum * 2
    assert ds["data_types"]["grad_accum_dtype"] == ("bf16" if name == "zero0" else "fp32")
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["optimizer"]["params"]["torch_adam"] is True  # CPU: no op compile
    # d_model² with a floor: 4,096 elements would mean hundreds of bucket flushes per step.
    assert ds["zero_optimization"].get("reduce_bucket_size", REDUCE_BUCKET_FLOOR) == REDUCE_BUCKET_FLOOR
    big = build(load_config(ds_config=name), ENV2, "fp32", hidden_size=4096)
    assert big["zero_optimization"].get("reduce_bucket_size", 4096**2) == 4096**2


@pytest.mark.parametrize("precision, accum, name, expected", [
    ("bf16", 4, "zero2", "fp32"), ("bf16", 4, "zero1", "fp32"), ("bf16", 4, "zero3", "fp32"),
    ("bf16", 1, "zero2", "bf16"), ("bf16", 1, "zero0", "bf16"), ("fp32", 4, "zero2", None), ("fp32", 4, "zero0", None),
])
def test_bf16_gradients_accumulate_in_fp32_where_there_is_something_to_accumulate(precision, accum, name, expected):
    ds = build(load_config(ds_config=name, grad_accum=accum), ENV2, precision, hidden_size=64)
    assert ds.get("data_types", {}).get("grad_accum_dtype") == expected


def test_bf16_accumulation_at_zero0_is_refused_unless_the_config_accepts_it():
    cfg = load_config(grad_accum=4)
    with pytest.raises(UsageError, match=r"x\.json: --grad_accum 4 with bf16 at ZeRO-0: DeepSpeed accumulates the "
                                         r"gradients in bf16 at stage 0; use a ZeRO-1/2 config"):
        fill({"zero_optimization": {"stage": 0}}, cfg, ENV2, "bf16", 64)
    accepted = {"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "bf16"}}
    assert fill(accepted, cfg, ENV2, "bf16", 64)["data_types"] == {"grad_accum_dtype": "bf16"}
    unsupported = {"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}}
    with pytest.raises(UsageError, match=r"data_types\.grad_accum_dtype = 'fp32': DeepSpeed accumulates bf16"):
        fill(unsupported, cfg, ENV2, "bf16", 64)
    mine = {"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}}  # a choice, kept
    assert fill(mine, cfg, ENV2, "bf16", 64)["data_types"] == {"grad_accum_dtype": "bf16"}


@pytest.mark.parametrize("raw", [{"bf16": {"enabled": "auto", "check_grad_overflow": False}},
                                 {"zero_optimization": {"stage": 2, "compute_grad_norm": False}}])
def test_switches_that_would_apply_nonfinite_gradients_are_refused(raw):
    with pytest.raises(UsageError, match=r"x\.json: \S+ = false would let an update computed from NaN/inf gradients"):
        fill(raw, load_config(), ENV2, "bf16", 64)


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
        fill(raw, load_config(), ENV2, "fp32", 64)


def test_universal_loading_is_switched_on_by_the_trainer():
    ds = build(load_config(ds_config="zero3"), ENV2, "fp32", 32, load_universal=True)
    assert ds["checkpoint"] == {"load_universal": True}
    assert "checkpoint" not in build(load_config(ds_config="zero3"), ENV2, "fp32", 32)


def test_conflicting_concrete_value_is_named():
    cfg = load_config(batch_size=8)
    raw = {"train_micro_batch_size_per_gpu": 16}
    with pytest.raises(UsageError, match=r"x\.json: train_micro_batch_size_per_gpu = 16 conflicts with --batch_size \(8\)"):
        fill(raw, cfg, ENV2, "fp32", 64)


def test_auto_without_a_value_is_named():
    raw = {"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}
    with pytest.raises(UsageError, match=r"zero_optimization\.sub_group_size is \"auto\" but the trainer has no value"):
        fill(raw, load_config(), ENV2, "fp32", 64)


def test_fp16_is_refused_with_the_reason(tmp_path):
    with pytest.raises(UsageError, match="fp16 is refused for T5 students"):
        fill({"fp16": {"enabled": True}}, load_config(), ENV2, "fp32", 64)
    with pytest.raises(UsageError, match="--precision fp16: fp16 is refused for T5 students: .* overflow fp16"):
        load_config(precision="fp16")


def test_auto_precision_is_fp32_on_cpu():
    assert resolve_precision(load_config(), CPU) == "fp32"
    assert resolve_precision(load_config(precision="bf16"), CPU) == "bf16"


GPU = torch.device("cuda", 1)


def fake_gpu(monkeypatch, name, capability, knows_emulation=True):
    """torch.cuda as on a GPU: bf16 is native from compute capability 8 (Ampere) on; torch's default
    probe also says yes where it is only emulated. ``knows_emulation=False``: a torch without the
    ``including_emulation`` argument."""
    def is_bf16_supported(*args, **kwargs):
        if not knows_emulation and (args or kwargs):
            raise TypeError("is_bf16_supported() got an unexpected keyword argument 'including_emulation'")
        return capability[0] >= 8 or kwargs.get("including_emulation", True)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("knows_emulation", [True, False])
def test_pre_ampere_gpus_get_fp32_and_refuse_bf16(monkeypatch, knows_emulation):
    fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0), knows_emulation)
    assert resolve_precision(load_config(), GPU) == "fp32"
    with pytest.raises(UsageError, match=r"--precision bf16: Tesla V100-SXM2-32GB has no native bf16"):
        resolve_precision(load_config(precision="bf16"), GPU)
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0), knows_emulation)
    assert resolve_precision(load_config(), GPU) == "bf16"
    assert resolve_precision(load_config(precision="bf16"), GPU) == "bf16"


def test_user_file_by_path_and_broken_json(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": "auto"}))
    ds = build(load_config(ds_config=str(f), grad_clip=2.0), ENV2, "fp32", 32)
    assert ds["gradient_clipping"] == 2.0 and ds["train_batch_size"] == 32 * 2
    f.write_text('{"zero_optimization": {"stage": 1},\n}')
    with pytest.raises(UsageError, match=r"mine\.json:2: not valid JSON"):
        build(load_config(ds_config=str(f)), ENV2, "fp32", 32)


def test_a_global_batch_fills_the_batch_autos_as_resolved_for_the_world_size():
    from cotmi_ds.config import resolve_global_batch

    env8 = DistEnv(rank=0, local_rank=0, world_size=8, local_world_size=8, device=torch.device("cpu"))
    cfg = resolve_global_batch(load_config("paper", dataset="svamp"), env8.world_size)
    ds = build(cfg, env8, "fp32", hidden_size=64)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 1)
    raw = {"train_batch_size": 128}
    with pytest.raises(UsageError, match=r"train_batch_size = 128 conflicts with --global_batch_size .* \(64\)"):
        fill(raw, cfg, env8, "fp32", 64)


@pytest.mark.parametrize("content, message", [
    (json.dumps({"zero_optimization": {"stage": "two"}}), "zero_optimization.stage must be one of 0, 1, 2, 3, got 'two'"),
    (json.dumps({"zero_optimization": {"stage": 4}}), "zero_optimization.stage must be one of 0, 1, 2, 3, got 4"),
    (json.dumps({"zero_optimization": 2}), "zero_optimization must be an object"),
    ('{"zero_optimization": {"stage": 1}, "comment": "d\u00e9j\u00e0"}'.encode("latin-1"),
     "not UTF-8 text (byte 0xe9 at offset 49); save it as UTF-8"),
])
def test_a_stage_that_is_not_a_number_and_a_file_that_is_not_utf8_are_one_line(tmp_path, content, message):
    from cotmi_ds.ds_configs import read_ds_config

    f = tmp_path / "mine.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError) as e:
        read_ds_config(str(f))
    assert str(e.value) == f"{f}: {message}"
def test_auto_is_zero0_alone_zero2_on_several_ranks_and_a_resume_keeps_its_stage():
    def chosen(*args, **kwargs):
        return choose_ds_config(*args, **kwargs).name

    assert load_config().ds_config == "auto"
    assert chosen("auto", world_size=1) == "zero0"
    assert chosen("auto", world_size=8) == "zero2"
    assert chosen("auto", world_size=8, saved_stage=0) == "zero0"  # started alone, resumed on 8
    assert chosen("auto", world_size=1, saved_stage=2) == "zero2"
    assert chosen("zero3", world_size=1, saved_stage=2) == "zero3"  # explicit wins (then checked)
    for world, stage in ((1, 0), (2, 2)):
        assert choose_ds_config("auto", world).stage == stage
    with pytest.raises(UsageError, match="nor auto"):
        choose_ds_config("zero9", world_size=1)
