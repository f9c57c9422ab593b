"""The DeepSpeed engine as the trainer configures it, on a one-parameter-vector model in bf16 and
fp32 on CPU (DeepSpeed's bf16 paths run there too): gradients accumulated over micro-batches in
fp32, and a step with NaN/inf gradients skipped and reported by ``TrainEngine.step`` at every stage."""
import pytest
import torch

from cotmi_ds.config import load_config
from cotmi_ds.ds_configs import choose_ds_config
from cotmi_ds.training.engine import TrainEngine, create_engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(one_rank):
    return one_rank


class Dot(torch.nn.Module):
    """loss = w·x: the gradient of w is x, exactly, in any precision x is representable in."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return (self.w * x.to(self.w.dtype)).sum()


def filled(env, ds_config, precision, grad_accum=1, **flags):
    cfg = load_config(ds_config=ds_config, batch_size=1, grad_accum=grad_accum, grad_clip=0.0, precision=precision,
                      **flags)
    return cfg, choose_ds_config(ds_config, env.world_size).fill(cfg, env, precision, hidden_size=4)


@pytest.mark.parametrize("ds_config", ["zero1", "zero2", "zero3"])
def test_bf16_accumulates_micro_batches_in_fp32(env, ds_config):
    """16 micro-batches: one gradient of 1, then 15 of 2^-8. Summed in bf16 every 2^-8/16 is lost
    against the running sum (half an ulp, rounded to even): the mean gradient comes out 1/16 instead
    of (1 + 15·2^-8)/16. The trainer's fill makes DeepSpeed sum in fp32: the update then equals the
    one a single batch 16 times larger gives, within one bf16 rounding of that gradient."""
    from deepspeed.utils import safe_get_full_fp32_param

    import deepspeed

    n = 16
    _, ds = filled(env, ds_config, "bf16", grad_accum=n)
    ds.pop("optimizer")  # plain SGD, lr 1: after one step the fp32 master weights are minus the gradient
    ds["zero_allow_untested_optimizer"] = True
    model = Dot()
    engine = TrainEngine(deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                              config=ds)[0], ds["zero_optimization"]["stage"], 1)
    xs = [torch.ones(4)] + [torch.full((4,), 2.0**-8)] * (n - 1)
    for x in xs:
        engine.ds.backward(engine.ds(x))
        engine.step()
    exact = -(1 + (n - 1) * 2.0**-8) / n
    master = safe_get_full_fp32_param(engine.ds.module.w)
    assert master is not None
    assert torch.allclose(master, torch.full((4,), exact), rtol=2.0**-8, atol=0), (master, exact)


@pytest.mark.parametrize("ds_config, precision", [("zero0", "fp32"), ("zero0", "bf16"), ("zero1", "bf16"),
                                                  ("zero2", "bf16"), ("zero2", "fp32")])
def test_nonfinite_gradients_skip_the_update_and_are_reported(env, ds_config, precision):
    """A finite loss whose gradient is NaN (sqrt at 0, times 0): the loss guard cannot see it. The
    update is skipped (weights and learning-rate schedule unchanged), ``TrainEngine.step`` says so
    and DeepSpeed counts it; the next good step trains on. ZeRO-0 in fp32 is the case DeepSpeed
    leaves to the bare torch optimizer."""
    cfg, ds = filled(env, ds_config, precision, warmup_steps=0, max_steps=10)
    model = Dot()
    engine = create_engine(model, ds, cfg, 1)
    x = torch.ones(4)
    results, weights = [], []
    for bad in (False, True, False):
        loss = engine.ds(x)
        if bad:
            loss = loss + torch.sqrt(loss.float() * 0).to(loss.dtype)
        assert torch.isfinite(loss)
        engine.ds.backward(loss)
        lr_before = engine.ds.get_lr()[0]
        results.append(engine.step())
        weights.append(model.w.detach().float().clone())
        if bad:
            assert engine.ds.get_lr()[0] == lr_before  # the schedule did not advance
    assert results == [False, True, False]
    assert engine.ds.skipped_steps == 1
    assert torch.equal(weights[1], weights[0]) and torch.isfinite(weights[2]).all()
    assert not torch.equal(weights[2], weights[1])

