"""Subnormal floats flushed to zero on CPU (``flush_subnormals``): every thread of the pool flushes when
the mode is set first, a pool made before is detected (then no thread flushes), and the fused loss's values and gradients at
random-weight logits (whose softmax is mostly subnormal) are those of IEEE arithmetic to fp32 rounding."""
import json
import subprocess
import sys

import pytest

# Each case is its own process: the mode is per thread, and pool threads copy it when created.
SCRIPT = r"""
import json, sys, torch
case = sys.argv[1]
if case == "late":  # a pool of 2 threads exists before the mode is set
    torch.set_num_threads(2); torch.randn(512, 512).mul_(2.0).sum()
from cotmi_ds.distributed import flush_subnormals
flushed = flush_subnormals(case != "kept")
torch.set_num_threads(2)
tiny = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)  # subnormals, by their bits
survivors = int(tiny.mul(1.0).count_nonzero())
torch.set_num_threads(1)  # the loss below: one summation order in every case, whatever the machine's load
from cotmi_ds.losses.fused import fused_losses
g = torch.Generator().manual_seed(0)
V, d, B = 4096, 256, 4
W = (2 * torch.randn(V, d, generator=g)).requires_grad_()  # logits' std 32, a random-weight T5's
h_lab, h_rat = (torch.randn(B, T, d, generator=g).requires_grad_() for T in (3, 24))
y_lab, y_rat = (torch.randint(0, V, (B, T), generator=g) for T in (3, 24))
out = fused_losses(W, h_lab, y_lab, h_rat, y_rat)
sum(out.values()).backward()
logits = h_rat.detach() @ W.detach().t()
p = torch.softmax(logits.double(), -1)
subnormal = float(((p < 2 ** -126) & (p >= 2 ** -149)).double().mean())  # fp32's subnormal band
torch.save({k: v.detach() for k, v in out.items()} | {"dW": W.grad, "dh": h_rat.grad}, sys.argv[2])
print(json.dumps({"flushed": flushed, "survivors": survivors, "subnormal_share": subnormal}))
"""


def _run(case, tmp_path):
    out = tmp_path / f"{case}.pt"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, case, str(out)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "2", "PATH": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("subnormals")
    return {case: _run(case, tmp) for case in ("flushed", "kept", "late")}


def test_set_first_every_thread_flushes(cases):
    report, _ = cases["flushed"]
    assert report == {**report, "flushed": True, "survivors": 0}


def test_kept_is_ieee(cases):
    report, _ = cases["kept"]
    assert report["flushed"] is False and report["survivors"] == 1 << 20


def test_a_pool_made_before_is_detected(cases):
    report, _ = cases["late"]
    assert report["flushed"] is False and report["survivors"] == 1 << 20  # not the main thread alone either


def test_the_fused_loss_is_the_same_to_fp32_rounding(cases):
    import torch

    (report, flushed), (_, kept) = cases["flushed"], cases["kept"]
    assert report["subnormal_share"] > 0.1  # the case the mode is for: much of the softmax is subnormal
    a, b = torch.load(flushed, weights_only=True), torch.load(kept, weights_only=True)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
