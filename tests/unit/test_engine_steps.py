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


def filled(env, ds_config, precision, grad_accum=1, grad_clip=0.0, **flags):
    cfg = load_config(ds_config=ds_config, batch_size=1, grad_accum=grad_accum, grad_clip=grad_clip,
                      precision=precision, **flags)
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
    """A finite loss whose gradient is NaN (sqrt at 0, times 0). The update is skipped (weights and
    AdamW's state unchanged), ``TrainEngine.step`` says so, and the next good step trains on. At
    ZeRO 1-3 DeepSpeed decides on the host: a bool, its own count, the schedule held. At ZeRO-0 the
    decision stays on the device (optimizer_step.py): a flag tensor nobody has to read at once, and
    the schedule, stepped on the host, moves on."""
    cfg, ds = filled(env, ds_config, precision, warmup_steps=0, max_steps=10)
    model = Dot()
    engine = create_engine(model, ds, cfg, 1)
    x = torch.ones(4)
    results, weights, lrs = [], [], []
    for bad in (False, True, False):
        loss = engine.ds(x)
        if bad:
            loss = loss + torch.sqrt(loss.float() * 0).to(loss.dtype)
        assert torch.isfinite(loss)
        engine.ds.backward(loss)
        lrs.append(engine.ds.get_lr()[0])
        results.append(engine.step())
        weights.append(model.w.detach().float().clone())
    assert [bool(r) for r in results] == [False, True, False]
    assert torch.equal(weights[1], weights[0]) and torch.isfinite(weights[2]).all()
    assert not torch.equal(weights[2], weights[1])
    assert _adamw_steps(engine.ds.basic_optimizer) == {2}  # the skipped update is not counted by AdamW
    if ds_config == "zero0":
        assert all(isinstance(r, torch.Tensor) for r in results[1:]) and engine.ds.skipped_steps == 0
        assert lrs[2] < lrs[1]
    else:
        assert engine.ds.skipped_steps == 1 and lrs[2] == lrs[1]  # the schedule did not advance

class Affine(torch.nn.Module):
    """loss = w·x + b·x[:2], weights exactly representable in bf16 (the bf16 weights and their fp32
    masters then start equal), so the reference starts from the very same numbers."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, generator=g).bfloat16().float())
        self.b = torch.nn.Parameter(torch.randn(2, generator=g).bfloat16().float())

    def forward(self, x):
        return (self.w * x.to(self.w.dtype)).sum() + (self.b * x[:2].to(self.b.dtype)).sum()


def _master(engine, param: torch.nn.Parameter, moment: str | None = None) -> torch.Tensor:
    """The fp32 weights the optimizer updates for ``param``, or their AdamW ``moment`` (exp_avg)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    wrapper = engine.optimizer
    if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):  # ZeRO-0 in bf16: per parameter
        masters = {id(p): m for ps, ms in zip(wrapper.fp16_groups, wrapper.fp32_groups) for p, m in zip(ps, ms)}
        master = masters[id(param)]
    elif engine.zero_optimization():  # ZeRO 1-3
        return safe_get_full_optimizer_state(param, moment) if moment else safe_get_full_fp32_param(param)
    else:  # ZeRO-0 in fp32: the weights themselves
        master = param
    return engine.basic_optimizer.state[master][moment] if moment else master


def _adamw_steps(optimizer) -> set[int]:
    return {int(s["step"]) for s in optimizer.state.values() if "step" in s}


@pytest.mark.parametrize("ds_config, precision, grad_accum", [
    ("zero0", "bf16", 1), ("zero1", "bf16", 1), ("zero1", "bf16", 2), ("zero2", "bf16", 1), ("zero3", "bf16", 1),
    ("zero0", "fp32", 1)])
def test_first_update_is_torch_adamws_first_update(env, ds_config, precision, grad_accum):
    """Before training AdamW has taken no step (bf16 at ZeRO-0 gets DeepSpeed's FP16_UnfusedOptimizer,
    which steps once on zero gradients as it is built), and the first update of the fp32 masters is
    torch's AdamW's on the same gradient from the same weights: lr, bias correction and weight decay
    (0.1 here) applied once, the gradient clipped to norm 1 as torch's clip_grad_norm_ clips it.
    ZeRO-1 with accumulation is DeepSpeed's BF16_Optimizer."""
    cfg, ds = filled(env, ds_config, precision, grad_accum=grad_accum, grad_clip=1.0, warmup_steps=0, max_steps=10,
                     weight_decay=0.1, lr=1e-2)
    model = Affine()
    reference = Affine()
    engine = create_engine(model, ds, cfg, 1)
    assert _adamw_steps(engine.ds.basic_optimizer) <= {0}  # no step counted before training
    x = torch.tensor([1.0, -0.5, 0.25, 2.0])  # exact in bf16: the gradient is x in any precision
    for _ in range(grad_accum):
        engine.ds.backward(engine.ds(x))  # DeepSpeed divides by the accumulation steps itself
        engine.step()
    assert _adamw_steps(engine.ds.basic_optimizer) == {1}

    torch_adamw = torch.optim.AdamW(reference.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    reference(x).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip)
    assert norm > 2 * cfg.grad_clip  # the clipping matters
    torch_adamw.step()
    for name, expected in reference.named_parameters():
        param = getattr(model, name)
        torch.testing.assert_close(_master(engine.ds, param), expected.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(_master(engine.ds, param, "exp_avg"), torch_adamw.state[expected]["exp_avg"],
                                   rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.as_tensor(engine.ds.get_global_grad_norm()).float(), norm, rtol=1e-6, atol=0)


def test_a_resumed_checkpoint_with_the_priming_step_counts_only_the_updates_it_applied(env):
    """A bf16 ZeRO-0 checkpoint saved while DeepSpeed's priming step still counted holds AdamW step
    counts one above its updates: set back once, on resume; a count that already fits is left alone,
    and nothing changes at other stages."""
    from cotmi_ds.training.engine import drop_priming_step

    cfg, ds = filled(env, "zero0", "bf16", warmup_steps=0, max_steps=10)
    engine = create_engine(Affine(), ds, cfg, 1)
    for _ in range(2):
        engine.ds.backward(engine.ds(torch.ones(4)))
        engine.step()
    for state in engine.ds.basic_optimizer.state.values():  # what such a checkpoint loads
        state["step"] += 1
    assert drop_priming_step(engine.ds.optimizer, updates_applied=2)
    assert _adamw_steps(engine.ds.basic_optimizer) == {2}
    assert not drop_priming_step(engine.ds.optimizer, updates_applied=2)
    assert _adamw_steps(engine.ds.basic_optimizer) == {2}

    cfg, ds = filled(env, "zero0", "fp32", warmup_steps=0, max_steps=10)
    engine = create_engine(Affine(), ds, cfg, 1)
    engine.ds.backward(engine.ds(torch.ones(4)))
    engine.step()
    assert not drop_priming_step(engine.ds.optimizer, updates_applied=0)
    assert _adamw_steps(engine.ds.basic_optimizer) == {1}
