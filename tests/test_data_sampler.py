"""The sampler's arithmetic, without files: permutations, shards, padding, re-sharding."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distprop.data.sampler import (EpochOrder, Stage, plan_rank, ranges_length, remaining_positions,
                                   slice_ranges)


def block_sizes():
    return st.lists(st.integers(1, 9), min_size=1, max_size=12)


def positions(ranges):
    return [p for lo, hi in ranges for p in range(lo, hi)]


def rank_positions(num_samples, world_size, batch_size, drop_last, history=()):
    plans = [plan_rank(num_samples, world_size, r, batch_size, drop_last, history) for r in range(world_size)]
    return plans, [[p for b in range(plan.num_batches) for p in positions(plan.batch_positions(b))]
                   for plan in plans]


@settings(max_examples=60, deadline=None)
@given(blocks=block_sizes(), seed=st.integers(0, 2**31), epoch=st.integers(0, 50), window=st.integers(1, 5))
def test_epoch_order_is_a_permutation_built_the_same_way_every_time(blocks, seed, epoch, window):
    order = EpochOrder(blocks, seed, epoch, window=window)
    everything = order.rows(0, len(order))
    assert sorted(everything.tolist()) == list(range(sum(blocks)))
    again = EpochOrder(blocks, seed, epoch, window=window)
    pieces = [again.rows(lo, min(lo + 5, len(again))) for lo in range(0, len(again), 5)]
    assert np.concatenate(pieces).tolist() == everything.tolist()


def test_another_epoch_or_seed_gives_another_order():
    blocks = [16] * 20
    base = EpochOrder(blocks, seed=3, epoch=0).rows(0, 320).tolist()
    assert EpochOrder(blocks, seed=3, epoch=1).rows(0, 320).tolist() != base
    assert EpochOrder(blocks, seed=4, epoch=0).rows(0, 320).tolist() != base


def test_no_shuffle_is_the_file_order():
    order = EpochOrder([3, 4, 5], seed=0, epoch=7, shuffle=False)
    assert order.rows(0, 12).tolist() == list(range(12))
    assert order.rows(5, 9).tolist() == [5, 6, 7, 8]  # any stretch: its own positions
    assert order.rows(12, 12).tolist() == []


@pytest.mark.parametrize("shuffle", [True, False])
def test_an_empty_stretch_of_the_order_selects_no_rows(shuffle):
    order = EpochOrder([3, 4, 5], seed=0, epoch=1, shuffle=shuffle)
    table = np.arange(12) * 10
    for position in (0, 5, 12):
        assert table[order.rows(position, position)].tolist() == []  # usable as an index: integers


def test_window_bounds_which_blocks_a_stretch_of_the_order_touches():
    blocks = [10] * 30
    window = 3
    order = EpochOrder(blocks, seed=1, epoch=2, window=window)
    starts = np.arange(0, 300, 10)
    for lo in range(0, 300, 30):  # every 30 positions = one window of 3 blocks
        touched = set(np.searchsorted(starts, order.rows(lo, lo + 30), side="right") - 1)
        assert len(touched) == window


def test_rows_within_a_window_are_mixed_across_its_blocks():
    order = EpochOrder([100] * 4, seed=0, epoch=0, window=4)
    first_batch = order.rows(0, 32) // 100
    assert len(set(first_batch.tolist())) == 4


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 120), world_size=st.integers(1, 4), batch_size=st.integers(1, 9),
       drop_last=st.booleans())
def test_every_rank_gets_the_same_batches_and_shards_are_disjoint(n, world_size, batch_size, drop_last):
    plans, per_rank = rank_positions(n, world_size, batch_size, drop_last)
    counts = {plan.num_batches for plan in plans}
    assert len(counts) == 1
    sizes = {tuple(len(positions(p.batch_positions(b))) for b in range(p.num_batches)) for p in plans}
    assert len(sizes) == 1, "batch k has the same size on every rank"
    everything = [p for rank in per_rank for p in rank]
    if drop_last:
        assert plans[0].num_batches == n // (world_size * batch_size)
        assert len(everything) == len(set(everything)), "no sample twice in an epoch"
        assert n - len(everything) < world_size * batch_size, "only the tail is dropped"
        assert all(len(positions(p.batch_positions(b))) == batch_size
                   for p in plans for b in range(p.num_batches))
    else:
        share = -(-n // world_size)
        assert plans[0].num_batches == -(-share // batch_size)
        assert set(everything) == set(range(n)), "every sample is seen"
        assert len(everything) - n == world_size * share - n < world_size, "padding repeats < world_size"


def test_drop_last_false_pads_the_last_rank_from_the_start_of_the_order():
    plans, per_rank = rank_positions(10, 4, 2, drop_last=False)
    assert per_rank == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]
    assert [p.num_batches for p in plans] == [2, 2, 2, 2]
    assert [len(positions(p.batch_positions(1))) for p in plans] == [1, 1, 1, 1]


def test_slice_ranges_wraps_around():
    assert slice_ranges(((5, 8), (20, 22)), 3, 9) == ((20, 22), (5, 8), (20, 21))
    assert slice_ranges(((0, 3),), 2, 2) == ()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 150), old_world=st.integers(1, 4), old_batch=st.integers(1, 8),
       new_world=st.integers(1, 4), new_batch=st.integers(1, 8), drop_last=st.booleans(), data=st.data())
def test_resharding_covers_the_rest_of_the_epoch(n, old_world, old_batch, new_world, new_batch, drop_last, data):
    old_plans, old_positions = rank_positions(n, old_world, old_batch, drop_last)
    consumed_batches = data.draw(st.integers(0, old_plans[0].num_batches))
    consumed = {p for rank in old_positions for p in rank[:consumed_batches * old_batch]}
    history = (Stage(old_world, old_batch, consumed_batches),)
    remaining = positions(remaining_positions(n, history, drop_last))
    assert set(remaining).isdisjoint(consumed)
    assert set(remaining) | consumed == set(range(n)), "consumed + remaining = the whole epoch"
    assert remaining == sorted(remaining), "remaining samples keep the epoch's order"

    new_plans, new_positions = rank_positions(n, new_world, new_batch, drop_last, history)
    assert len({p.num_batches for p in new_plans}) == 1
    yielded = [p for rank in new_positions for p in rank]
    assert set(yielded) <= set(remaining)
    if drop_last:
        assert len(yielded) == len(set(yielded))
        assert len(remaining) - len(yielded) < new_world * new_batch
    else:
        assert set(yielded) == set(remaining)
        assert len(yielded) - len(remaining) < new_world


def test_two_reshards_in_one_epoch_still_partition_it():
    n, drop_last = 97, True
    first = Stage(3, 4, 2)
    second = Stage(2, 5, 3)
    taken = Counter()
    for history in ((), (first,)):
        stage = first if not history else second
        for rank in range(stage.world_size):
            plan = plan_rank(n, stage.world_size, rank, stage.batch_size, drop_last, history)
            for b in range(stage.batches_consumed):
                taken.update(positions(plan.batch_positions(b)))
    remaining = positions(remaining_positions(n, (first, second), drop_last))
    assert max(taken.values()) == 1
    assert set(taken).isdisjoint(remaining)
    assert set(taken) | set(remaining) == set(range(n))
    assert ranges_length(remaining_positions(n, (first, second), drop_last)) == n - 3 * 4 * 2 - 2 * 5 * 3


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 4"):
        plan_rank(10, 4, 4, 1, True)


def test_the_order_of_a_seed_and_epoch_never_changes():
    """A run resumed from a checkpoint, maybe by a newer distprop, must see the order
    the saved run saw: these positions are part of the checkpoint format."""
    order = EpochOrder([3, 4, 5, 2], seed=7, epoch=1, window=2)
    assert order.block_order.tolist() == [2, 0, 3, 1]
    assert order.rows(0, 14).tolist() == [7, 1, 8, 2, 11, 10, 9, 0, 6, 5, 4, 13, 3, 12]
    assert EpochOrder([3, 4, 5, 2], seed=7, epoch=1).window == 4  # the default window


def test_an_epoch_of_no_blocks_is_empty():
    order = EpochOrder([], seed=0, epoch=0)
    assert len(order) == 0 and order.rows(0, 0).tolist() == []


def test_adjacent_ranges_come_out_merged():
    assert slice_ranges(((0, 3), (3, 5), (8, 9)), 0, 6) == ((0, 5), (8, 9))
    assert slice_ranges(((0, 3), (3, 5)), 2, 9) == ((2, 5), (0, 4))


def test_sampler_errors_say_what():
    with pytest.raises(ValueError, match=r"^seed and epoch must be >= 0 \(got seed=-1, epoch=0\)$"):
        EpochOrder([2], seed=-1, epoch=0)
    with pytest.raises(ValueError, match=r"^seed and epoch must be >= 0 \(got seed=0, epoch=-2\)$"):
        EpochOrder([2], seed=0, epoch=-2)
    with pytest.raises(ValueError, match=r"^window must be >= 1 \(got 0\)$"):
        EpochOrder([2], seed=0, epoch=0, window=0)
    with pytest.raises(IndexError, match=r"^positions \[1, 5\) outside S of length 2$"):
        EpochOrder([2], seed=0, epoch=0).rows(1, 5)
    with pytest.raises(ValueError, match=r"^cannot take positions from an empty sequence$"):
        slice_ranges((), 0, 1)
    with pytest.raises(ValueError, match=r"^rank 3 outside 0..2$"):
        plan_rank(10, 3, 3, 2, False)
    with pytest.raises(IndexError, match=r"^batch 5 outside 0..4$"):
        plan_rank(10, 1, 0, 2, False).batch_positions(5)
