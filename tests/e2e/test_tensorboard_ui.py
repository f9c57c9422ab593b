"""The TensorBoard UI serves what the trainer logs: a real `tensorboard` process, read over HTTP."""
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

import cotmi_ds.training.telemetry as telemetry_mod
from cotmi_ds.distributed import DistEnv
from cotmi_ds.training.telemetry import PHASES, Telemetry
from cotmi_ds.distributed import reserved_port
from tests.conftest import kill_group

TAGS = ["loss/total", "optim/skipped_micro_batches", "throughput/samples_per_s", "throughput/tflops_per_device",
        "throughput/mfu_pct", "time/forward_ms", "memory/rss_gib", "eval/test/accuracy"]


def _write_run(run_dir, monkeypatch):
    """Three logged steps and an evaluation, through the trainer's own Telemetry class."""
    monkeypatch.setattr(telemetry_mod, "peak_flops_per_s", lambda device, precision: (1e12, "test peak"))
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    tel = Telemetry(run_dir, env, start_step=0, max_steps=3, log_every=1, config_yaml="mode: mi\n",
                    hparams={"mode": "mi", "lr": 0.003})
    for step in (1, 2, 3):
        for phase in PHASES:
            with tel.timed(phase):
                pass
        tel.record_micro_step({"total": torch.tensor(10.0 / step)}, samples=8, tokens=100, flops=10**9)
        tel.end_step(step, lr=1e-3, grad_norm=1.0)
    tel.log_eval(3, "test", {"accuracy": 0.75, "correct": 3, "total": 4})
    tel.close()


def _get(port, path, data=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_tensorboard_serves_the_logged_scalars_over_http(tmp_path, monkeypatch):
    _write_run(tmp_path, monkeypatch)
    with reserved_port() as port:  # held while the server runs: nobody else can take the port
        _serve_and_check(tmp_path, port)


def _serve_and_check(tmp_path, port):
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, tags = time.time() + 120, {}
        while time.time() < deadline:  # the server starts, then loads the event files
            assert proc.poll() is None, proc.stdout.read()
            try:
                tags = _get(port, "/data/plugin/scalars/tags").get("tb", {})
                if set(TAGS) <= set(tags):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        assert set(TAGS) <= set(tags), sorted(tags)

        def scalars(tag):
            query = urllib.parse.urlencode({"run": "tb", "tag": tag})
            return [(step, value) for _, step, value in _get(port, f"/data/plugin/scalars/scalars?{query}")]

        loss = scalars("loss/total")
        assert [s for s, _ in loss] == [1, 2, 3] and abs(loss[2][1] - 10 / 3) < 1e-5
        assert scalars("eval/test/accuracy") == [(3, 0.75)]
        assert all(v > 0 for _, v in scalars("throughput/mfu_pct"))
        assert scalars("optim/skipped_micro_batches") == [(1, 0.0), (2, 0.0), (3, 0.0)]
        # The config: as text, and in the HPARAMS tab.
        assert "config/text_summary" in _get(port, "/data/plugin/text/tags")["tb"]
        experiment = _get(port, "/data/plugin/hparams/experiment", data=b'{"experimentName": ""}')
        assert {"mode", "lr"} <= {h["name"] for h in experiment["hparamInfos"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_group(proc)
