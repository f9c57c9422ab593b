"""Telemetry: every tag with its meaning, rank 0 only, the bar on a terminal and log lines elsewhere."""
import fcntl
import os
import resource
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

import cotmi_ds.training.telemetry as telemetry_mod
from cotmi_ds.distributed import DistEnv
from cotmi_ds.training.telemetry import PHASES, Telemetry
from tests.conftest import REPO, child_env
from tests.tb import read_scalars

CPU = torch.device("cpu")


def _env(rank=0, world_size=1):
    return DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size, device=CPU)


def _telemetry(tmp_path, rank=0, **kw):
    kw.setdefault("start_step", 0)
    kw.setdefault("max_steps", 4)
    kw.setdefault("log_every", 2)
    return Telemetry(tmp_path, _env(rank), config_yaml="lr: 0.001\n", hparams={"lr": 1e-3, "mode": "mi",
                     "overwrite": False, "output_dir": None}, **kw)


def _one_step(tel, step, loss=2.0, sleep=0.01, skipped=0):
    for phase in PHASES:
        with tel.timed(phase):
            time.sleep(sleep)
    parts = {"total": torch.tensor(loss), "label_ce": torch.tensor(1.0), "mi": torch.tensor(3.0)}
    tel.record_micro_step(parts, samples=8, tokens=100, flops=10**12)
    return tel.end_step(step, lr=1e-3, grad_norm=0.5, skipped_micro_batches=skipped)


def test_tags_values_and_mfu_with_a_known_peak(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(telemetry_mod, "peak_flops_per_s", lambda device, precision: (4e12, "fake 4 TFLOP/s"))
    outer_start = time.perf_counter()
    tel = _telemetry(tmp_path)
    assert _one_step(tel, 1, loss=2.0) is None  # not a logging step
    spike = bytearray(256 * 2**20)  # 0.25 GiB touched and given back: the peak stays above the RSS
    del spike
    values = _one_step(tel, 2, loss=4.0, skipped=1)
    outer = time.perf_counter() - outer_start
    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    tel.log_eval(2, "test", {"accuracy": 0.25, "ece": 0.125, "correct": 1, "total": 4})
    tel.log_eval(2, "valid", {"accuracy": 0.5}, seconds=1.5)
    tel.log_eval_time(2, 3.5)
    tel.close()

    assert values["loss/total"] == pytest.approx(3.0) and values["loss/mi"] == pytest.approx(3.0)
    assert values["optim/skipped_micro_batches"] == 1 and values["optim/grad_norm"] == 0.5
    # Against a clock of the test's own: the interval's wall time lies between the 2 x 4 timed
    # 10 ms sleeps inside it and the time around the whole block.
    assert 16 / outer <= values["throughput/samples_per_s"] <= 16 / 0.080
    assert 80 <= 2 * values["time/step_ms"] <= 1000 * outer
    # 2 steps of 8 samples and 1e12 FLOPs each, over the interval's wall time.
    seconds = 2 * values["time/step_ms"] / 1000
    assert values["throughput/samples_per_s"] == pytest.approx(16 / seconds, rel=1e-6)
    assert values["throughput/tokens_per_s"] == pytest.approx(200 / seconds, rel=1e-6)
    assert values["throughput/tflops_per_device"] == pytest.approx(2 / seconds, rel=1e-6)
    assert values["throughput/mfu_pct"] == pytest.approx(100 * values["throughput/tflops_per_device"] / 4)
    for phase in PHASES:  # 10 ms sleeps, per step
        assert 9 <= values[f"time/{phase}_ms"] < values["time/step_ms"]
    assert sum(values[f"time/{p}_ms"] for p in PHASES) <= values["time/step_ms"]

    scalars = read_scalars(tmp_path / "tb")
    for tag in ("loss/total", "loss/label_ce", "loss/mi", "optim/lr", "optim/grad_norm", "optim/skipped_micro_batches",
                "throughput/samples_per_s", "throughput/tokens_per_s", "throughput/samples_per_s_per_device",
                "throughput/tokens_per_s_per_device", "throughput/tflops_per_device", "throughput/mfu_pct",
                "time/step_ms", "time/data_wait_ms", "time/forward_ms", "time/backward_ms",
                "time/optimizer_ms", "memory/rss_gib", "eval/test/accuracy", "eval/test/ece"):
        assert [s for s, _ in scalars[tag]] == [2], tag
    assert "eval/test/correct" not in scalars  # counts are printed, not charted
    # Memory of this very process: the current RSS and the peak so far (never below the current),
    # in GiB: the kernel's high-water mark read right after the step, to within 5%.
    assert 0.05 < values["memory/rss_gib"] < values["memory/peak_rss_gib"] - 0.2
    assert values["memory/peak_rss_gib"] == pytest.approx(max(peak_now, values["memory/rss_gib"]), rel=0.05)
    assert [s for s, _ in scalars["memory/peak_rss_gib"]] == [2]
    assert not any(t.startswith("memory/max_") for t in scalars)  # GPU-only tags
    assert scalars["time/eval_s"] == [(2, 3.5)]
    out = capsys.readouterr().out
    assert "step 2: test accuracy 0.2500 (1/4); ece 0.125" in out and "step 2: valid accuracy 0.5000 in 1.5 s" in out


def test_config_is_logged_as_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tel = _telemetry(tmp_path)
    tel.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["lr"].number_value == 1e-3 and hp["mode"].string_value == "mi"
    assert hp["overwrite"].string_value == "false" and "output_dir" not in hp
    assert "_hparams_/session_end_info" in content  # written at close: the run shows as finished
    # The HPARAMS tab's metrics are tags the run writes itself (checked against a logged step).
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert metrics == {"eval/test/accuracy", "eval/valid/accuracy", "loss/total", "throughput/samples_per_s"}
    tel = _telemetry(tmp_path / "logged", max_steps=2)
    _one_step(tel, 1, sleep=0)
    _one_step(tel, 2, sleep=0)
    for split in ("valid", "test"):
        tel.log_eval(2, split, {"accuracy": 0.5})
    tel.close()
    assert metrics <= set(read_scalars(tmp_path / "logged" / "tb"))


def test_mfu_is_not_logged_on_cpu_and_the_reason_is_said_once(tmp_path, capsys):
    tel = _telemetry(tmp_path, max_steps=6)
    for step in range(1, 7):
        _one_step(tel, step, sleep=0)
    tel.close()
    out = capsys.readouterr().out
    assert out.count("throughput/mfu_pct is not logged: no peak FLOP/s for a cpu device") == 1
    scalars = read_scalars(tmp_path / "tb")
    assert "throughput/mfu_pct" not in scalars and "throughput/tflops_per_device" in scalars


def test_plain_log_lines_when_the_output_is_not_a_terminal(tmp_path, capsys):
    tel = _telemetry(tmp_path)
    for step in range(1, 5):
        _one_step(tel, step, sleep=0)
    tel.close()
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("samples/s" in line and "| eta " in line and "loss 2.0000" in line for line in lines)
    assert captured.err == ""  # no bar


def test_other_ranks_write_and_print_nothing(tmp_path, capsys):
    tel = _telemetry(tmp_path, rank=1)
    for step in range(1, 5):
        _one_step(tel, step, sleep=0)
    tel.log_eval(4, "test", {"accuracy": 1.0})
    tel.print("hello")
    tel.close()
    assert capsys.readouterr() == ("", "")
    assert not (tmp_path / "tb").exists()


_BAR_SCRIPT = """
import sys, time, torch
from pathlib import Path
from cotmi_ds.distributed import DistEnv
from cotmi_ds.training.telemetry import Telemetry
out = Path(sys.argv[1])
tel = Telemetry(out, DistEnv(0, 0, 1, 1, torch.device("cpu")), start_step=0, max_steps=6, log_every=2,
                config_yaml="x: 1")
for step in range(1, 7):
    tel.record_micro_step({"total": torch.tensor(1.5)}, samples=4, tokens=10)
    time.sleep(0.05)
    tel.end_step(step, lr=0.1, grad_norm=None)
tel.close()
print("stdout-is-a-tty" if sys.stdout.isatty() else "stdout-is-a-pipe", flush=True)
"""


def _run_on_a_terminal(tmp_path, columns: int) -> tuple[str, str]:
    """Run _BAR_SCRIPT with stderr on a pseudo-terminal of ``columns`` columns (stdout a pipe);
    return what the terminal showed and what went to stdout."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", _BAR_SCRIPT, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=slave, env=child_env(), text=True)
    os.close(slave)
    chunks, deadline = [], time.time() + 120
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout, _ = proc.communicate(timeout=60)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal
    return terminal, stdout


def test_progress_bar_on_a_terminal(tmp_path):
    """A tqdm bar with step, ETA, loss and samples/s; no log lines."""
    terminal, stdout = _run_on_a_terminal(tmp_path, columns=120)
    assert "6/6" in terminal and "loss=1.5000" in terminal and "samples_s=" in terminal, terminal
    assert "<00:00" in terminal  # tqdm's [elapsed<remaining]: the ETA
    assert "step 2/6 |" not in stdout and "stdout-is-a-pipe" in stdout


def test_log_lines_on_a_terminal_without_a_width(tmp_path):
    """A 0-column pseudo-terminal (some CI wrappers) would show an empty bar: log lines instead."""
    terminal, stdout = _run_on_a_terminal(tmp_path, columns=0)
    assert "6/6" not in terminal
    assert "step 2/6 | loss 1.5000" in stdout and "| eta " in stdout, stdout


class FakeCudaMemory:
    """torch.cuda's peak-memory counters, driven by the test."""

    def __init__(self):
        self.peak = 0.0

    def use(self, gib):
        self.peak = max(self.peak, gib)

    def max_memory_allocated(self, device=None):
        return self.peak * 2**30

    def reset_peak_memory_stats(self, device=None):
        self.peak = 0.0


class FakeEvent:
    """torch.cuda.Event on a CPU: it happens when recorded; the waits on it are counted."""
    waits = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self, stream=None):
        self.at = time.perf_counter()

    def synchronize(self):
        FakeEvent.waits += 1

    def elapsed_time(self, end):
        assert self.at is not None and end.at is not None
        return 1000.0 * (end.at - self.at)


def test_phase_timers_on_a_gpu_record_events_and_wait_only_when_read(monkeypatch):
    """On a GPU each phase is a pair of CUDA events; nothing waits for the device while the phases
    run (no torch.cuda.synchronize, no event wait), and reading the interval waits once, on the
    last event."""
    from cotmi_ds.training.telemetry import PhaseTimers

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("a device-wide wait"))
    FakeEvent.waits = 0
    timers = PhaseTimers(torch.device("cuda", 0))
    for _ in range(2):
        for phase, seconds in zip(PHASES, (0.0, 0.02, 0.04, 0.0)):
            with timers.timed(phase):
                time.sleep(seconds)
    assert FakeEvent.waits == 0
    read = timers.seconds()
    assert FakeEvent.waits == 1
    assert read["forward"] == pytest.approx(0.04, abs=0.015) and read["backward"] == pytest.approx(0.08, abs=0.015)
    assert read["data_wait"] < 0.01 and read["optimizer"] < 0.01
    timers.reset()
    assert timers.seconds() == dict.fromkeys(PHASES, 0.0) and FakeEvent.waits == 1


def test_memory_peaks_are_per_interval_and_leave_evaluation_out(tmp_path, monkeypatch):
    """A GPU run (torch.cuda faked): each logged memory/max_allocated_gib is the peak of that
    interval's training steps; an evaluation's larger peak in between is not counted, the interval's
    training peak from before it is."""
    memory = FakeCudaMemory()
    monkeypatch.setattr(telemetry_mod, "peak_flops_per_s", lambda device, precision: (None, "fake"))
    for name in ("max_memory_allocated", "max_memory_reserved", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(memory, name.replace("reserved", "allocated")))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    gpu = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cuda", 0))
    tel = Telemetry(tmp_path, gpu, start_step=0, max_steps=4, log_every=2, config_yaml="")
    logged = []
    for step, gib in ((1, 1.0), (2, 0.5), (3, 3.0), (4, 2.0)):
        memory.use(gib)
        if step == 4:
            with tel.paused():  # an evaluation between steps 3 and 4
                memory.use(5.0)
        values = _one_step(tel, step, sleep=0)
        if values is not None:
            logged.append(values["memory/max_allocated_gib"])
    tel.close()
    assert logged == [1.0, 3.0]


def test_a_nonfinite_micro_batch_counts_for_throughput_not_for_the_loss(tmp_path):
    """The finite flag stays on the device until the log step: a NaN micro-batch (its update was
    skipped) is left out of the logged losses, not out of the samples it cost."""
    tel = _telemetry(tmp_path, max_steps=1, log_every=1)
    for loss in (2.0, float("nan"), 4.0):
        total = torch.tensor(loss)
        tel.record_micro_step({"total": total}, samples=8, tokens=100, finite=torch.isfinite(total))
    values = tel.end_step(1, lr=1e-3, grad_norm=None)
    tel.close()
    assert values["loss/total"] == pytest.approx(3.0)
    assert values["throughput/samples_per_s"] * values["time/step_ms"] / 1000 == pytest.approx(24)
