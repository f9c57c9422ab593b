"""A folder of wheels for another machine, made where there is network and installed where there is
none, for a named target (its Python version and platform). Standard library only: it runs on a
fresh GPU machine before anything is installed.

What goes in: every distribution `pip install -e .[test]` needs (pyproject.toml's requirements at
their ranges, transformers 5 included, deepspeed's own, the build backend), resolved by pip for the
target, except torch and whatever is there only because torch needs it (the CUDA libraries, triton):
the GPU machine has its own torch. That is decided on the requirement graph: pip resolves against a
stand-in torch distribution that requires nothing, so torch's dependencies never enter the
resolution (an accelerate or a deepspeed that requires torch does not pull it in).

``FOLDER/target.json`` records the target; ``check`` compares it, and every wheel's tags, with the
machine it runs on before anything is installed.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

TARGET_FILE = "target.json"
DEEPSPEED = "deepspeed==0.19.8"  # no wheel on PyPI: built here from its source release (pure Python)
BUILD = ["setuptools>=68", "wheel"]  # pyproject.toml's build backend, for the editable install
# Never in the folder, whoever requires them: the GPU machine's own torch and its CUDA stack.
NOT_SHIPPED = re.compile(r"^(torch|triton|nvidia[-_](?!ml[-_]py).*|cuda[-_].*)$")


@dataclass(frozen=True)
class Target:
    python_version: str        # "3.11"
    platforms: tuple[str, ...]  # pip platform tags, e.g. ("manylinux_2_28_aarch64",)

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    def pip_args(self) -> list[str]:
        args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", self.python_version]
        for abi in (self.abi, "abi3", "none"):
            args += ["--abi", abi]
        for platform in self.platforms:
            for tag in older_manylinux(platform):
                args += ["--platform", tag]
        return args


def older_manylinux(platform: str) -> list[str]:
    """A glibc-2.N machine also runs the wheels of every older glibc (PEP 600); pip expands that for
    its own machine, not for a --platform it is given (pip/_internal/utils/compatibility_tags.py
    ``_get_custom_platforms``): manylinux_2_N_arch, then 2_(N-1) ... 2_5 and the legacy names."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if m is None:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return [t for minor in range(glibc, 4, -1)
            for t in [f"manylinux_2_{minor}_{arch}"] + ([f"{legacy[minor]}_{arch}"] if minor in legacy else [])]


def this_machine() -> Target:
    """The running interpreter's version and platform."""
    return Target(f"{sys.version_info.major}.{sys.version_info.minor}", (platform_of(supported_tags()),))


def platform_of(tags: list[str]) -> str:
    """The platform tag to name for a machine with these tags (most specific first, as sys_tags
    orders them): its newest manylinux/musllinux tag (pip also takes the older ones then), else the
    first that is not "any" (a bare linux_* tag matches no wheel on PyPI)."""
    platforms = [t.split("-")[2] for t in tags if not t.endswith("-any")]
    newest = [p for p in platforms if p.startswith(("manylinux_", "musllinux_"))]
    return (newest or platforms or ["any"])[0]


def supported_tags() -> list[str]:
    """The wheel tags this interpreter installs (packaging, or the copy pip vendors)."""
    try:
        from packaging.tags import sys_tags
    except ImportError:
        from pip._vendor.packaging.tags import sys_tags
    return [str(t) for t in sys_tags()]


def _distribution(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_tags(filename: str) -> tuple[str, set[str]]:
    """(distribution name, its tags) from a wheel's file name: name-version(-build)-py-abi-platform.whl,
    each of the last three possibly a dotted set."""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name")
    pys, abis, platforms = (p.split(".") for p in parts[-3:])
    return _distribution(parts[0]), {f"{p}-{a}-{pl}" for p in pys for a in abis for pl in platforms}


def _stand_in_torch(folder: Path, version: str) -> str:
    """A torch wheel with no files and no requirements, for the resolution only."""
    name = f"torch-{version}.dist-info"
    files = {f"{name}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
             f"{name}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{name}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{name}/RECORD"])
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return f"torch=={version}"


def requirements(repo: Path) -> list[str]:
    import tomllib

    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    return [r for r in project["dependencies"] + project["optional-dependencies"]["test"]
            if _distribution(re.split(r"[<>=!~;\[ ]", r)[0]) not in ("torch", "deepspeed")]


def prepare(dest: Path, target: Target, repo: Path, torch_version: str) -> list[str]:
    """Fill ``dest`` (see the module docstring); returns the wheel file names."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), DEEPSPEED], check=True)
    deepspeed = next(dest.glob("deepspeed-*.whl"))
    if wheel_tags(deepspeed.name)[1] != {"py3-none-any"}:
        raise RuntimeError(f"{deepspeed.name}: expected a pure-Python wheel (built without its compiled ops)")
    with tempfile.TemporaryDirectory(prefix="gpu-check-wheels-") as tmp:
        tmp = Path(tmp)
        (tmp / "stand-in").mkdir()
        pin = _stand_in_torch(tmp / "stand-in", torch_version + "+preinstalled")
        (tmp / "constraints.txt").write_text(pin + "\n")
        report = tmp / "report.json"
        subprocess.run([*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                        "--target", str(tmp / "nowhere"), *target.pip_args(), "--find-links", str(dest),
                        "--find-links", str(tmp / "stand-in"), "-c", str(tmp / "constraints.txt"),
                        *requirements(repo), *BUILD, DEEPSPEED], check=True)
        resolved = [(item["metadata"]["name"], item["metadata"]["version"])
                    for item in json.loads(report.read_text())["install"]]
    wanted = [f"{name}=={version}" for name, version in resolved
              if not NOT_SHIPPED.match(_distribution(name)) and _distribution(name) != "deepspeed"]
    subprocess.run([*pip, "download", "--no-deps", *target.pip_args(), "-d", str(dest), *wanted], check=True)
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    (dest / TARGET_FILE).write_text(json.dumps({
        "python_version": target.python_version, "platforms": list(target.platforms),
        "resolved": sorted(f"{n}=={v}" for n, v in resolved if _distribution(n) != "torch"),
        "wheels": wheels, "not_shipped": "torch and what only it needs: the GPU machine's own"}, indent=1) + "\n")
    return wheels


def check(folder: Path, tags: list[str] | None = None, python_version: str | None = None) -> str | None:
    """None if ``folder`` installs here (or on the machine the tags and Python version describe), else
    one line saying why not and what to do."""
    tags = supported_tags() if tags is None else tags
    here = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    meta_file = folder / TARGET_FILE
    if not meta_file.is_file():
        return f"{folder}: no {TARGET_FILE}; make the folder with --prepare_wheels"
    meta = json.loads(meta_file.read_text())
    remake = (f"make it again for this machine: --prepare_wheels DIR --python_version {here} "
              f"--platform {platform_of(tags)}")
    if meta["python_version"] != here:
        return (f"{folder} was made for Python {meta['python_version']} on {', '.join(meta['platforms'])}; "
                f"this machine is Python {here} on {platform_of(tags)}: {remake}")
    for wheel in sorted(p.name for p in folder.glob("*.whl")):
        name, wheel_tag_set = wheel_tags(wheel)
        if NOT_SHIPPED.match(name):
            return f"{folder}: {wheel} must not be in the folder (the GPU machine's own torch and CUDA libraries stay)"
        if not wheel_tag_set & set(tags):
            return (f"{folder}: {wheel} does not install here (made for {', '.join(meta['platforms'])}, "
                    f"Python {meta['python_version']}): {remake}")
    return None
