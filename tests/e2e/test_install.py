"""A non-editable install: the built wheel in a fresh virtualenv (the heavy dependencies are taken from
the current environment, not reinstalled) trains from an empty directory and finds its shipped DeepSpeed
configs and Slurm templates by name."""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env
from tests.e2e.test_mode_runs import SMALL


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """bin/ of a virtualenv holding only the cotmi_ds wheel; it sees this environment's packages
    through a .pth file."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(REPO / "cotmi_ds", src / "cotmi_ds", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # With setuptools here, build offline; else pip fetches it into an isolated build environment.
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([*pip, "wheel", "--no-deps", *offline, "-w", str(root / "dist"), str(src)], check=True,
                   capture_output=True, timeout=300)
    wheel = next((root / "dist").glob("cotmi_ds-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return venv / "bin"


def cotmi(bin_dir: Path, args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = child_env()
    env.pop("PYTHONPATH")  # nothing from the checkout
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run([str(bin_dir / "cotmi"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_installed_package_trains_from_an_empty_directory(installed, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import cotmi_ds; print(cotmi_ds.__file__)"],
                           cwd=tmp_path, env={**child_env(), "PYTHONPATH": ""}, capture_output=True, text=True)
    assert where.stdout.startswith(str(installed.parent)), where.stdout + where.stderr
    proc = cotmi(installed, ["train", "--ds_config", "zero3", "--output_dir", "run", *SMALL], tmp_path, 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "model").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_installed_package_prints_its_templates_and_configs(installed, tmp_path):
    template = cotmi(installed, ["slurm", "template", "multinode"], tmp_path)
    assert template.returncode == 0 and template.stdout.startswith("#!/bin/bash"), template.stderr
    assert template.stdout == (REPO / "cotmi_ds" / "cluster" / "templates" / "multinode.sbatch").read_text()
    config = cotmi(installed, ["ds_config", "zero3_offload"], tmp_path)
    assert config.returncode == 0 and '"offload_optimizer"' in config.stdout, config.stderr
    doctor = cotmi(installed, ["doctor", *SMALL, "--output_dir", "run"], tmp_path, 300)
    assert doctor.returncode == 0 and "doctor: all 9 checks passed" in doctor.stdout, doctor.stdout + doctor.stderr
    bench = cotmi(installed, ["bench", "step"], tmp_path)
    assert bench.returncode == 2 and "cotmi bench runs from a checkout" in bench.stderr, bench.stderr
