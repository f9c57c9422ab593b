"""BatchOrder: epochs keep their last partial batch (as the release's Trainer), every rank runs the
same number of micro-batches, the loss weights average to the whole batch, and resume is exact, also
on another world size."""
import pytest

from cotmi_ds.data.sampler import BatchOrder


def _orders(n, micro, world, accum, seed=1):
    return [BatchOrder(n, micro, r, world, seed, accum) for r in range(world)]


def _global_batch(orders):
    """One optimizer step: grad_accum micro-steps, one draw per rank each."""
    return [o.next() for _ in range(orders[0].grad_accum) for o in orders]


def test_svamp_epoch_has_eleven_full_batches_and_one_of_sixteen():
    order = BatchOrder(720, 64, 0, 1, seed=0)
    assert order.batches_per_epoch == 12
    draws = [order.next() for _ in range(12)]
    assert [d.samples for d in draws] == [64] * 11 + [16]
    assert all(d.weight == 1.0 for d in draws)
    seen = [i for d in draws for i in d.indices]
    assert sorted(seen) == list(range(720))
    nxt = order.next()
    assert order.epoch == 1 and nxt.samples == 64 and nxt.indices != draws[0].indices


@pytest.mark.parametrize("n, micro, world, accum", [
    (720, 8, 8, 1), (720, 2, 8, 4), (103, 4, 3, 1), (103, 3, 2, 3), (3, 2, 4, 1), (50, 64, 1, 1)])
def test_every_row_once_per_epoch_and_the_weights_average_to_the_whole_batch(n, micro, world, accum):
    orders = _orders(n, micro, world, accum)
    global_batch = micro * world * accum
    steps = -(-n // global_batch)
    assert orders[0].batches_per_epoch == steps * accum
    seen = []
    for step in range(steps):
        draws = _global_batch(orders)
        rows = [i for d in draws for i in d.indices[:d.samples]]
        assert len(rows) == min(global_batch, n - step * global_batch)
        # DeepSpeed averages the weighted micro-batch losses over ranks x accumulation: each row
        # then counts 1/len(rows), as in the release's mean over the (partial) batch.
        assert sum(d.weight for d in draws) == pytest.approx(len(draws))
        for d in draws:
            assert len(d.indices) == max(d.samples, 1)  # a rank without rows runs one stand-in row...
            assert d.weight == pytest.approx(d.samples * len(draws) / len(rows))  # ...with weight 0
        seen += rows
    assert sorted(seen) == list(range(n))
    assert all(o.epoch == 0 and o.batch_in_epoch == o.batches_per_epoch for o in orders)


def test_a_rank_left_without_rows_gets_a_stand_in_of_weight_zero():
    draws = _global_batch(_orders(3, 2, 4, 1))
    assert [d.samples for d in draws] == [1, 1, 1, 0]
    assert draws[3].weight == 0.0 and len(draws[3].indices) == 1


def test_resume_mid_epoch_continues_exactly():
    ref = _orders(103, 4, 3, 2)
    stream = [_global_batch(ref) for _ in range(12)]  # 5 global batches of 24 per epoch: crosses one
    for stop in (3, 4, 5, 7):
        probe = _orders(103, 4, 3, 2)
        for _ in range(stop):
            _global_batch(probe)
        resumed = _orders(103, 4, 3, 2)
        for o, p in zip(resumed, probe):
            o.load_state_dict(p.state_dict())
        assert [_global_batch(resumed) for _ in range(12 - stop)] == stream[stop:]


# Layouts of one global batch of 64: (micro-batch, ranks, accumulation)
LAYOUTS = [(64, 1, 1), (8, 8, 1), (16, 2, 2), (4, 4, 4), (2, 8, 4)]


@pytest.mark.parametrize("before, after", list(zip(LAYOUTS, LAYOUTS[1:] + LAYOUTS[:1])) + [(LAYOUTS[2],) * 2])
@pytest.mark.parametrize("steps", [5, 11, 12])
def test_resume_on_another_world_size_continues_at_the_same_row(before, after, steps):
    """The same global batch on any layout: a resumed run draws exactly the rows the uninterrupted
    one would have (as sets per optimizer step), through the partial batch into the next epoch."""
    first = _orders(720, *before)
    for _ in range(steps):
        _global_batch(first)
    reference = [_step_rows(first) for _ in range(14 - steps)]
    ran = _orders(720, *before)
    for _ in range(steps):
        _global_batch(ran)
    resumed = _orders(720, *after)
    for o in resumed:
        o.load_state_dict(ran[0].state_dict())
    assert [_step_rows(resumed) for _ in range(14 - steps)] == reference


def _step_rows(orders):
    return sorted(i for d in _global_batch(orders) for i in d.indices[:d.samples])


def test_a_changed_global_batch_resumes_after_the_rows_consumed_rounded_up():
    two = _orders(100, 4, 2, 1)
    seen = [i for _ in range(5) for d in _global_batch(two) for i in d.indices]  # 40 rows
    one = BatchOrder(100, 12, 0, 1, seed=1)
    one.load_state_dict(two[0].state_dict())
    assert one.batch_in_epoch == 4  # 40 rows seen -> continue after 48
    rest = [i for _ in range(one.batches_per_epoch - one.batch_in_epoch) for i in one.next_indices()]
    assert not set(seen) & set(rest) and len(seen) + len(rest) == 92  # 8 skipped, none repeated


def test_a_state_written_before_partial_batches_still_loads():
    order = BatchOrder(100, 8, 0, 1, seed=1)
    order.load_state_dict({"epoch": 2, "batch_in_epoch": 5, "global_batch": 8})
    assert (order.epoch, order.batch_in_epoch) == (2, 5)


def test_an_empty_split_is_refused():
    with pytest.raises(ValueError, match="the training split is empty"):
        BatchOrder(0, 4, 0, 2, seed=0)


def test_a_position_outside_the_epoch_is_refused_and_rows_beyond_it_end_the_epoch():
    from cotmi_ds.errors import UsageError
    from cotmi_ds.training.state import TrainState

    trainer = TrainState(BatchOrder(10, 2, 0, 1, seed=0)).state_dict()  # 5 micro-steps an epoch
    state = trainer["order"]
    with pytest.raises(UsageError, match=r"^--resume x: the data position \(micro-step 6\) lies outside an epoch of 5"):
        TrainState(BatchOrder(10, 2, 0, 1, seed=0)).load_state_dict(
            {**trainer, "order": {**state, "batch_in_epoch": 6}}, 3, "--resume x")
    other = BatchOrder(10, 4, 0, 1, seed=0)  # another layout: counted in rows, at most the epoch's
    other.load_state_dict({**state, "rows_in_epoch": 10**9 + 1})
    assert other.batch_in_epoch == other.batches_per_epoch
