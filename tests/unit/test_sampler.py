"""BatchOrder: epochs keep their last partial batch (as the release's Trainer), every rank runs the
same number of micro-batches, the loss weights average to the whole batch, and resume is exact, also
on another world size; with length grouping too."""
import random

import pytest

from cotmi_ds.data.sampler import BatchOrder


def _lengths(n, seed=7):
    """Row lengths as varied as real data: mostly short, a long tail."""
    rng = random.Random(seed)
    return [int(rng.lognormvariate(3.5, 0.6)) + 1 for _ in range(n)]


def _orders(n, micro, world, accum, seed=1, group=False):
    return [BatchOrder(n, micro, r, world, seed, accum, lengths=_lengths(n), group_by_length=group)
            for r in range(world)]


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


@pytest.mark.parametrize("group", [False, True], ids=["random", "grouped"])
@pytest.mark.parametrize("n, micro, world, accum", [
    (720, 8, 8, 1), (720, 2, 8, 4), (103, 4, 3, 1), (103, 3, 2, 3), (3, 2, 4, 1), (50, 64, 1, 1)])
def test_every_row_once_per_epoch_and_the_weights_average_to_the_whole_batch(n, micro, world, accum, group):
    orders = _orders(n, micro, world, accum, group=group)
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


@pytest.mark.parametrize("group", [False, True], ids=["random", "grouped"])
def test_resume_mid_epoch_continues_exactly(group):
    ref = _orders(103, 4, 3, 2, group=group)
    stream = [_global_batch(ref) for _ in range(12)]  # 5 global batches of 24 per epoch: crosses one
    for stop in (3, 4, 5, 7):
        probe = _orders(103, 4, 3, 2, group=group)
        for _ in range(stop):
            _global_batch(probe)
        resumed = _orders(103, 4, 3, 2, group=group)
        for o, p in zip(resumed, probe):
            o.load_state_dict(p.state_dict())
        assert [_global_batch(resumed) for _ in range(12 - stop)] == stream[stop:]


# Layouts of one global batch of 64: (micro-batch, ranks, accumulation)
LAYOUTS = [(64, 1, 1), (8, 8, 1), (16, 2, 2), (4, 4, 4), (2, 8, 4)]


@pytest.mark.parametrize("group", [False, True], ids=["random", "grouped"])
@pytest.mark.parametrize("before, after", list(zip(LAYOUTS, LAYOUTS[1:] + LAYOUTS[:1])) + [(LAYOUTS[2],) * 2])
@pytest.mark.parametrize("steps", [5, 11, 12])
def test_resume_on_another_world_size_continues_at_the_same_row(before, after, steps, group):
    """The same global batch on any layout: a resumed run draws exactly the rows the uninterrupted
    one would have (as sets per optimizer step), through the partial batch into the next epoch."""
    first = _orders(720, *before, group=group)
    for _ in range(steps):
        _global_batch(first)
    reference = [_step_rows(first) for _ in range(14 - steps)]
    ran = _orders(720, *before, group=group)
    for _ in range(steps):
        _global_batch(ran)
    resumed = _orders(720, *after, group=group)
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


def _padded(order, lengths, batches):
    """Tokens of ``batches`` micro-batches padded to their longest row, and the real tokens in them."""
    padded = real = 0
    for _ in range(batches):
        rows = [lengths[i] for i in order.next_indices()]
        padded, real = padded + max(rows) * len(rows), real + sum(rows)
    return padded, real


def test_grouping_sorts_each_mega_batch_and_removes_most_padding():
    n, lengths = 4000, _lengths(4000)
    grouped = BatchOrder(n, 16, 0, 1, seed=3, lengths=lengths, group_by_length=True)
    assert grouped.group_rows == 16 * 50
    batches = [[lengths[i] for i in grouped.next_indices()] for _ in range(grouped.batches_per_epoch)]
    assert all(b == sorted(b, reverse=True) for b in batches)  # cut from sorted mega-batches
    longest = [b[0] for b in batches[:50]]
    assert longest != sorted(longest, reverse=True)  # the batches shuffled: no long-to-short sweeps
    grouped = BatchOrder(n, 16, 0, 1, seed=3, lengths=lengths, group_by_length=True)
    plain = BatchOrder(n, 16, 0, 1, seed=3, lengths=lengths)
    (gp, gr), (pp, pr) = _padded(grouped, lengths, plain.batches_per_epoch), _padded(plain, lengths, 250)
    assert gr == pr == sum(lengths)  # the same rows, only the padding differs
    assert 1 - gr / gp < 0.1 and 1 - pr / pp > 0.3


def test_grouped_orders_differ_between_epochs_and_seeds():
    lengths = _lengths(800)

    def epoch_rows(seed, epoch):
        order = BatchOrder(800, 8, 0, 1, seed=seed, lengths=lengths, group_by_length=True, epoch=epoch)
        return [i for _ in range(order.batches_per_epoch) for i in order.next_indices()]
    assert len({tuple(epoch_rows(s, e)) for s, e in [(0, 0), (0, 1), (1, 0)]}) == 3


@pytest.mark.parametrize("before, after", [
    ((8, 1, 1, True), (32, 2, 1, True)),     # another global batch: another mega-batch size
    ((8, 2, 1, True), (16, 1, 1, False)),    # grouping switched off
    ((16, 1, 1, False), (8, 2, 1, True))])   # grouping switched on
def test_a_resume_that_changes_the_grouping_keeps_the_epochs_order(before, after):
    """The resumed epoch continues in the order it was started with, so no row repeats in it; the
    next epoch follows the new settings."""
    *layout, group = before
    ran = _orders(720, *layout, group=group)
    seen = [i for _ in range(20) for d in _global_batch(ran) for i in d.indices[:d.samples]]
    *layout, group = after
    resumed = _orders(720, *layout, group=group)
    for o in resumed:
        o.load_state_dict(ran[0].state_dict())
    rest = []
    while resumed[0].epoch == 0 and resumed[0].batch_in_epoch < resumed[0].batches_per_epoch:
        rest += [i for d in _global_batch(resumed) for i in d.indices[:d.samples]]
    # none repeated (a new global batch resumes at its next batch boundary: 160 rows -> 192)
    assert not set(seen) & set(rest) and 720 - resumed[0].global_batch < len(seen) + len(rest) <= 720
    fresh = _orders(720, *layout, group=group)
    for o in fresh:
        o.epoch = 1
    assert _step_rows(resumed) == _step_rows(fresh)


def test_grouping_needs_lengths():
    with pytest.raises(ValueError, match="needs the rows' lengths"):
        BatchOrder(10, 2, 0, 1, seed=0, group_by_length=True)
    with pytest.raises(ValueError, match="9 lengths for 10 rows"):
        BatchOrder(10, 2, 0, 1, seed=0, lengths=[1] * 9)


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
