"""`cotmi plan` against `cotmi bench memory` on two CPU ranks (one torchrun launch, ~30 s): the
buffers DeepSpeed's ZeRO-2 adds once gradients are reduced between ranks are in the plan."""
import pytest

from tests.e2e.test_bench_memory import plan_and_measured


def test_the_plan_holds_a_two_rank_zero2_peak(tmp_path):
    planned, measured = plan_and_measured(tmp_path, 2, "none", "false", ranks=2)
    assert planned == pytest.approx(measured, rel=0.15), (planned, measured)
