"""The GPU check's wheel folder against the machine it is to install on: its Python version and
every wheel's platform tags are checked before anything is installed, and neither torch nor a CUDA
library may be in it; a mismatch is one line and exit 2. (Building a folder needs the network:
tests/e2e/test_gpu_check.py builds one for another machine.)"""
import json
import sys

import pytest
from packaging.tags import compatible_tags, cpython_tags

from benchmarks import gpu_check
from benchmarks.wheel_folder import TARGET_FILE, check, older_manylinux, platform_of, wheel_tags

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"
CP = "cp" + HERE.replace(".", "")
# An x86_64 box with glibc 2.35 running this Python, its tags as packaging lists them (most specific first).
_PLATFORMS = ["linux_x86_64", *older_manylinux("manylinux_2_35_x86_64")]
BOX = [str(t) for t in (*cpython_tags(platforms=_PLATFORMS), *compatible_tags(platforms=_PLATFORMS))]


def _folder(tmp_path, wheels, python_version=HERE, platforms=("manylinux_2_35_x86_64",)):
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name in wheels:
        (folder / name).write_bytes(b"")
    (folder / TARGET_FILE).write_text(json.dumps({"python_version": python_version, "platforms": list(platforms)}))
    return folder


def test_a_folder_made_for_the_box_installs_there(tmp_path):
    folder = _folder(tmp_path, ["fire-0.7.1-py3-none-any.whl", f"pyyaml-6.0.4-{CP}-{CP}-manylinux2014_x86_64.whl",
                                "safetensors-0.8.0-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"])
    assert check(folder, BOX, HERE) is None


@pytest.mark.parametrize("wheels, python_version, says", [
    (["fire-0.7.1-py3-none-any.whl"], "3.99", "was made for Python 3.99 on manylinux_2_28_aarch64; this machine is "
                                              f"Python {HERE} on manylinux_2_35_x86_64"),
    ([f"pyyaml-6.0.4-{CP}-{CP}-manylinux_2_28_aarch64.whl"], HERE, "does not install here"),
    ([f"pyyaml-6.0.4-{CP}-{CP}-manylinux_2_38_x86_64.whl"], HERE, "does not install here"),  # a newer glibc
    ([f"torch-2.13.0-{CP}-{CP}-manylinux_2_28_x86_64.whl"], HERE, "must not be in the folder"),
    (["nvidia_cublas_cu12-12.9.1.4-py3-none-manylinux_2_27_x86_64.whl"], HERE, "must not be in the folder"),
])
def test_a_folder_for_another_machine_is_refused_in_one_line(tmp_path, wheels, python_version, says):
    folder = _folder(tmp_path, wheels, python_version, ("manylinux_2_28_aarch64",))
    problem = check(folder, BOX, HERE)
    assert problem is not None and says in problem and "\n" not in problem, problem
    if "made for" in problem or "install here" in problem:
        assert problem.endswith(f"--python_version {HERE} --platform manylinux_2_35_x86_64")


def test_nvidia_ml_py_is_not_a_cuda_library(tmp_path):
    folder = _folder(tmp_path, ["nvidia_ml_py-13.580.82-py3-none-any.whl"])
    assert check(folder, BOX, HERE) is None


def test_the_check_refuses_before_installing_or_writing_anything(tmp_path, capsys):
    folder = _folder(tmp_path, ["fire-0.7.1-py3-none-any.whl"], python_version="3.99")
    out = tmp_path / "out"
    assert gpu_check.main(["--wheels", str(folder), "--dry_run", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: error: ") and "Python 3.99" in err[0]
    assert not out.exists()


def test_prepare_wheels_names_its_target(capsys):
    assert gpu_check.main(["--prepare_wheels", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--python_version" in err[0] and "--print_target" in err[0]


def test_tags_of_wheel_names_and_platforms():
    assert wheel_tags("numpy-2.1.0-cp312-cp312-manylinux_2_17_aarch64.manylinux2014_aarch64.whl") == (
        "numpy", {"cp312-cp312-manylinux_2_17_aarch64", "cp312-cp312-manylinux2014_aarch64"})
    assert wheel_tags("Py_Yaml-1.0-1-py3-none-any.whl") == ("py-yaml", {"py3-none-any"})  # with a build tag
    tags = older_manylinux("manylinux_2_28_aarch64")
    assert tags[0] == "manylinux_2_28_aarch64" and tags[-1] == "manylinux1_aarch64"
    assert "manylinux_2_17_aarch64" in tags and "manylinux2014_aarch64" in tags and "manylinux_2_29_aarch64" not in tags
    assert older_manylinux("macosx_14_0_arm64") == ["macosx_14_0_arm64"]
    assert platform_of(BOX) == "manylinux_2_35_x86_64"
