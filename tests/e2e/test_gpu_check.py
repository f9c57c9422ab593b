"""benchmarks/gpu_check.py --dry_run: every stage of the one-shot GPU check, on CPU with tiny shapes,
so that the script keeps working between the occasions someone has a GPU. Its bench stages are
also the end-to-end tests of `cotmi bench loss` (both tables) and of `cotmi bench step`'s --gpu path
(a T5Config file, fixed-length batches, bf16) and its --lengths path (each lever against the released
step, on the shipped cqa histogram)."""
import json
import re
import subprocess
import sys

import pytest

from cotmi_ds.config import load_config
from tests.conftest import REPO, child_env


def test_gpu_check_dry_run_passes_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry_run", "--out", str(out)],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0 and summary["ok"], proc.stdout + json.dumps(summary, indent=1)
    assert list(summary["stages"]) == ["cuda_tests", "bench_loss", "bench_step", "bench_step_lengths", "student",
                                        "host_syncs", "train"]
    assert "4 passed" in (out / "cuda_tests.log").read_text()  # fp32 x 2 variants, bf16, the engine
    train = summary["stages"]["train"]
    assert train["samples_per_s"] > 0 and train["peak_memory_gib"] > 0
    assert train["optimizer"]["torch_adam"] is True  # torch's AdamW: nothing compiled at run time
    assert set(train["time_split_ms"]) == {"data_wait", "forward", "backward", "optimizer"}
    assert train["time_split_ms"]["forward"] > 0 and train["loss_first_logged"] > 0
    # The trainer's steps at default flags: its own code waits only at log and save steps.
    syncs = (out / "host_syncs.log").read_text()
    assert "the trainer's own code waits only at log, evaluation and save steps" in syncs, syncs[-2000:]
    assert re.search(r"^step 1: \d+ host waits", syncs, re.M) and "step 4 (log/save)" in syncs

    # cotmi bench loss: both tables, every variant's row, the ratios.
    out_loss = (out / "bench_loss.log").read_text()
    assert "Loss alone" in out_loss and "MI training step" in out_loss and "machine: " in out_loss
    number = r"\s+[\d.,]+"
    for name in ("reference", "fused", "fused, encoder x2"):
        assert re.search(rf"^{re.escape(name)}{number}{number}{number}$", out_loss, re.M), (name, out_loss)
    ratios = re.findall(r"^fused/reference\s+([\d.]+)x\s+([\d.]+)x$", out_loss, re.M)
    assert len(ratios) == 2 and all(float(x) > 0 for pair in ratios for x in pair), out_loss
    assert "running the encoder once for both prefixes saved" in out_loss

    # cotmi bench step: no --loss given, so the project side runs the trainer's default, and says so.
    out_step = (out / "bench_step.log").read_text()
    assert f"project (DistillModel, --loss {load_config().loss}, --mode mi, DeepSpeed " in out_step
    assert "precision bf16" in out_step and "fixed-length random tokens" in out_step
    rows = {m.group(1): m.group(0).split() for m in re.finditer(r"^(project|released) +\d.*$", out_step, re.M)}
    assert set(rows) == {"project", "released"}, out_step
    for cells in rows.values():
        samples_s, tokens_s, step_ms, peak_rss = float(cells[1]), float(cells[2]), float(cells[3]), float(cells[6])
        assert samples_s > 0 and tokens_s == pytest.approx(samples_s * (16 + 4 + 16 + 16), rel=0.02)
        assert step_ms > 0 and peak_rss > 0.1 and cells[5] == "n/a"  # no MFU on a CPU
    assert re.search(r"project / released: [\d.]+x samples/s, [\d.]+x peak RSS", out_step)
    assert "MFU: n/a, no peak FLOP/s for a cpu device" in out_step

    # cotmi bench step --lengths: one project worker per lever setting, each against the released
    # worker; the exact swaps (sdpa, flushed subnormals) end where the eager project step does on the same batches.
    out_lengths = (out / "bench_step_lengths.log").read_text()
    assert "lengths: the shipped cqa histogram (8,766 rows of train" in out_lengths
    padding = {m.group(1): float(m.group(2))
               for m in re.finditer(r"^  (random|grouped): padding ([\d.]+)%", out_lengths, re.M)}
    assert padding["grouped"] < padding["random"], out_lengths
    rows = {m.group(1): m.group(0).split()
            for m in re.finditer(r"^(released|none|sdpa|group|flush) +\d.*$", out_lengths, re.M)}
    assert rows.keys() == {"released", "none", "sdpa", "group", "flush"}, out_lengths
    for exact in ("sdpa", "flush"):  # the loss column (bf16)
        assert float(rows[exact][8]) == pytest.approx(float(rows["none"][8]), rel=1e-2), exact
    assert "note:" not in out_lengths  # every shape compiled in the warm-up, the subnormal mode set
    assert re.search(r"^group .* [\d.]+x samples/s \([\d.]+x best of rounds\), [\d.]+x peak$", out_lengths, re.M)
    # The project step's time split (the trainer's timers) and its host waits: none at ZeRO-0.
    assert re.search(r"^project step, wall time per step: forward [\d.]+ ms, backward [\d.]+ ms, optimizer [\d.]+ ms$",
                     out_step, re.M), out_step
    waits = re.search(r"^host waits per project step: [\d.]+ \(1 steps counted\), 0 of them the trainer's; by origin: "
                      r"(.*)$", out_step, re.M)
    assert waits and waits.group(1) == "none", out_step


def _pypi_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/fire/", timeout=10).close()
        return True
    except OSError:
        return False


def test_a_wheel_folder_made_for_another_machine_is_refused_here(tmp_path):
    """--prepare_wheels for a machine this one is not (another Python, aarch64): the folder holds
    transformers 5 and everything else the install needs, built for that target, and no torch or
    CUDA library; here the check refuses it in one line before installing anything."""
    if not _pypi_reachable():
        pytest.skip("needs PyPI (pip download) to build the folder")
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.11"
    folder = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--prepare_wheels", str(folder),
                           "--python_version", other, "--platform", "manylinux_2_28_aarch64"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = json.loads((folder / "target.json").read_text())["wheels"]
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"transformers", "deepspeed", "datasets", "accelerate", "setuptools", "pytest"} <= names
    assert not {n for n in names if n in ("torch", "triton") or n.startswith(("nvidia_cu", "nvidia_nccl"))}
    assert next(w for w in wheels if w.startswith("transformers-")).split("-")[1].startswith("5.")
    assert all(w.endswith(("-none-any.whl", "_aarch64.whl")) for w in wheels), wheels
    assert any(f"-cp{other.replace('.', '')}-" in w for w in wheels)  # binaries for that Python

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--wheels", str(folder),
                           "--dry_run", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("gpu_check: error: ") and f"made for Python {other} on manylinux_2_28_aarch64" in err[0]
    assert not (tmp_path / "out").exists()
