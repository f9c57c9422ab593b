"""`cotmi doctor`: every check's failure is one line with a fix, provoked with fake facts on CPU; and
the command itself on this machine."""
from pathlib import Path

import pytest

from cotmi_ds.cluster import doctor as d
from cotmi_ds.config import load_config
from cotmi_ds.ds_configs import read_ds_config
from cotmi_ds.ds_configs.ops import OpProbe


def failed(check: d.Check, *phrases: str) -> None:
    line = check.line()
    assert check.fix and line.startswith("  FAIL  ") and "; fix: " in line and "\n" not in line, line
    for phrase in phrases:
        assert phrase in line, line


def test_torch_below_the_floor():
    failed(d.check_torch("2.3.1+cu121", "12.1", "0.19.8"), "torch 2.3.1+cu121", "install torch>=2.4")
    assert d.check_torch("2.13.0+cpu", None, "0.19.8").fix is None


@pytest.mark.parametrize("args, phrases", [
    ((4, 4, 0, False, None), ["4 asked for, none visible", "CPU build", "download.pytorch.org/whl/cu"]),
    ((4, 4, 0, True, None), ["torch cannot use them", "nvidia-smi"]),
    ((4, 4, 2, True, "0,1"), ["4 asked for, only 2 visible (CUDA_VISIBLE_DEVICES=0,1)"]),
    ((2, 4, 2, True, "2,3"), ["4 ranks per node but 2 GPU(s) visible", "COTMI_PROCS_PER_NODE=2"]),
])
def test_gpus_seen_vs_asked_for(args, phrases):
    failed(d.check_gpus(*args), *phrases)


def test_gpus_that_match_pass():
    assert d.check_gpus(2, 2, 2, True, "4,5").fix is None
    assert d.check_gpus(0, 1, 0, False, None).fix is None


def test_bf16_nccl():
    failed(d.check_bf16("bf16", True, False, "Tesla V100"), "Tesla V100 has no native bf16", "--precision fp32")
    assert d.check_bf16("bf16", True, True, "NVIDIA H100").fix is None
    failed(d.check_nccl(True, False, None), "no NCCL")
    assert d.check_nccl(False, False, None).fix is None


def test_ops_that_cannot_be_built_fail_and_buildable_ones_say_how_to_prebuild():
    raw = read_ds_config("zero3_offload")[0]
    cannot = OpProbe(lambda op: False, lambda op, dev: ["a C++ compiler (c++)"])
    failed(d.check_ops_line(raw, "zero3_offload.json", "cuda", cannot), "cpu_adam", "DS_BUILD_CPU_ADAM=1 pip install")
    can = d.check_ops_line(raw, "zero3_offload.json", "cuda", OpProbe(lambda op: False, lambda op, dev: []))
    assert can.fix is None and "compiled at start-up" in can.detail and "DS_BUILD_CPU_ADAM=1" in can.detail
    assert d.check_ops_line(read_ds_config("zero2")[0], "zero2.json", "cuda").fix is None


def test_model_not_cached_offline_unreachable_or_unknown(tmp_path):
    failed(d.check_model("google/t5-v1_1-base", cached=False, offline=True, problem=None),
           "not in the Hugging Face cache and HF_HUB_OFFLINE=1", "hf download google/t5-v1_1-base")
    failed(d.check_model("google/t5-v1_1-base", cached=False, offline=False,
                         problem="unreachable: the Hugging Face hub cannot be reached from n1 (refused)"),
           "not in the cache and the Hugging Face hub cannot be reached from n1", "HF_HUB_OFFLINE=1")
    failed(d.check_model("google/t5-v1_1-bsae", cached=False, offline=False, problem="no such model on the hub"),
           "google/t5-v1_1-bsae: no such model on the hub", "check the name")
    failed(d.check_model(str(tmp_path), False, False, None), "without config.json")
    assert d.check_model("google/t5-v1_1-base", cached=True, offline=True, problem=None).fix is None
    assert d.check_model("google/t5-v1_1-base", cached=False, offline=False, problem=None).fix is None


def test_data_missing(tmp_path):
    (tmp_path / "cqa").mkdir()
    failed(d.check_data(load_config(dataset="cqa", data_root=str(tmp_path))), "cqa", "--data_root")


def test_run_dir_not_writable_or_not_shared(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    failed(d.check_run_dir(blocker / "run", 1, 0, "t", 0), "is not writable", "COTMI_RUN_DIR")
    # Two "nodes" that see different directories never see each other's marker.
    failed(d.check_run_dir(tmp_path / "a", 2, 0, "j1", 0.5), "not the same directory on every node",
           "shared filesystem")
    # The same directory: node 1's marker is there, so node 0 passes at once.
    (tmp_path / "b" / ".doctor").mkdir(parents=True)
    (tmp_path / "b" / ".doctor" / "j2-node1").write_text("n2")
    assert d.check_run_dir(tmp_path / "b", 2, 0, "j2", 0.5).fix is None


def test_disk_against_the_checkpoint_size():
    failed(d.check_disk(Path("/runs"), 10 * 2**30, 250_000_000, keep_last=3), "10.0 GiB free", "--keep_last")
    assert d.check_disk(Path("/runs"), 100 * 2**30, 250_000_000, keep_last=3).fix is None
