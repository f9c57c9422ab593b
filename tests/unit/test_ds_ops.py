"""The optimizer on each device and ZeRO config, and the compiled DeepSpeed ops a config needs:
nothing on the default path; for the others, one line that says how to prebuild what is missing."""
import pytest
import torch

from cotmi_ds.config import load_config
from cotmi_ds.distributed import DistEnv
from cotmi_ds.ds_configs import choose_ds_config, read_ds_config
from cotmi_ds.ds_configs.ops import OpProbe, check_ops, ops_needed
from cotmi_ds.errors import UsageError

CPU = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
GPU = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cuda", 0))


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_gpus_get_torchs_fused_adamw_and_need_no_compiled_op(name):
    ds = choose_ds_config(name, 1).fill(load_config(ds_config=name), GPU, "bf16", 64)
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    assert ops_needed(ds, "cuda") == [] and ops_needed(read_ds_config(name)[0], "cuda") == []


@pytest.mark.parametrize("name", ["zero0", "zero2", "zero3", "zero3_offload"])
def test_cpus_get_torchs_fused_adamw_too(name):
    params = choose_ds_config(name, 1).fill(load_config(ds_config=name), CPU, "fp32", 64)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    assert ops_needed(read_ds_config(name)[0], "cpu") == []


def test_a_configs_own_fused_setting_is_kept(tmp_path):
    import json

    raw = read_ds_config("zero0")[0]
    raw["optimizer"]["params"]["fused"] = False
    path = tmp_path / "unfused.json"
    path.write_text(json.dumps(raw))
    params = choose_ds_config(str(path), 1).fill(load_config(ds_config=str(path)), CPU, "fp32", 64)["optimizer"]["params"]
    assert params["fused"] is False


def test_offload_from_gpus_uses_deepspeeds_cpu_adam():
    cfg = load_config(ds_config="zero3_offload")
    params = choose_ds_config(cfg.ds_config, 1).fill(cfg, GPU, "bf16", 64)["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params
    assert ops_needed(read_ds_config("zero3_offload")[0], "cuda") == ["cpu_adam"]


def test_torch_adam_false_needs_fused_adam():
    raw = {"optimizer": {"type": "Adam", "params": {"torch_adam": False}}}
    assert ops_needed(raw, "cuda") == ["fused_adam"]
    assert ops_needed({"optimizer": {"type": "Lamb"}}, "cuda") == []  # not an Adam: not checked here


def probe(prebuilt=(), missing=()):
    return OpProbe(lambda op: op in prebuilt, lambda op, device: list(missing))


def test_a_prebuilt_op_passes_silently():
    assert check_ops(read_ds_config("zero3_offload")[0], "zero3_offload", "cuda", probe(prebuilt=["cpu_adam"])) == []


def test_a_buildable_op_warns_with_the_prebuild_command():
    [warning] = check_ops(read_ds_config("zero3_offload")[0], "zero3_offload", "cuda", probe())
    assert "cpu_adam op (DeepSpeedCPUAdam, the optimizer of ZeRO-Offload) is not prebuilt" in warning
    assert "DS_BUILD_CPU_ADAM=1 pip install --no-build-isolation" in warning and "\n" not in warning


def test_an_op_that_cannot_be_built_here_is_refused_in_one_line():
    with pytest.raises(UsageError) as e:
        check_ops(read_ds_config("zero3_offload")[0], "zero3_offload", "cuda",
                  probe(missing=["a C++ compiler (c++)"]))
    msg = str(e.value)
    assert msg.startswith("zero3_offload: needs DeepSpeed's cpu_adam op") and "\n" not in msg
    assert "missing a C++ compiler (c++)" in msg and "DS_BUILD_CPU_ADAM=1 pip install" in msg
    raw = {"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}
    with pytest.raises(UsageError, match="fused_adam op .* DS_BUILD_FUSED_ADAM=1"):
        check_ops(raw, "my.json", "cuda", probe(missing=["nvcc (the CUDA toolkit; set CUDA_HOME)"]))
