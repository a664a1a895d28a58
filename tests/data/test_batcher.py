"""Sharding: N ranks see exactly the one-process global batches, every row once per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.data import Batcher, DataError, rank_bounds


def _data(n: int, d: int = 3):
    x = np.arange(n * d, dtype=np.float32).reshape(n, d)
    y = np.arange(n, dtype=np.int64)  # y is the row number: identifies rows
    return x, y


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n,batch", [(1, 4), (7, 3), (50, 8), (103, 16), (64, 64), (9, 2)])
def test_rank_slices_concatenate_to_the_one_process_batches(world, n, batch):
    x, y = _data(n)
    one = Batcher(x, y, batch, seed=11)
    ranks = [Batcher(x, y, batch, seed=11, rank=r, world=world) for r in range(world)]
    for b in ranks:
        assert b.steps_per_epoch == one.steps_per_epoch == -(-n // batch)
    for epoch in (0, 1):
        seen_by_rank: list[list[int]] = [[] for _ in range(world)]
        seen = []
        for step in range(one.steps_per_epoch):
            gx, gy, gcount = (a.copy() if hasattr(a, "copy") else a
                              for a in one.batch(epoch, step))
            assert gcount == len(gy) <= batch
            parts = []
            for r, b in enumerate(ranks):
                lx, ly, count = b.batch(epoch, step)
                assert count == gcount
                lo, hi = rank_bounds(gcount, r, world)
                assert len(ly) == hi - lo  # np.array_split sizes
                assert lx.shape == (hi - lo, 3)
                parts.append((lx.copy(), ly.copy()))
                seen_by_rank[r].extend(ly.tolist())
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), gy)
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), gx)
            np.testing.assert_array_equal(gx, x[gy])
            seen.extend(gy.tolist())
        # every row exactly once per epoch, shards disjoint
        assert sorted(seen) == list(range(n))
        flat = [i for s in seen_by_rank for i in s]
        assert len(flat) == len(set(flat)) == n


def test_array_split_semantics():
    for count in range(0, 12):
        for world in range(1, 6):
            expect = [len(a) for a in np.array_split(np.arange(count), world)]
            assert [np.subtract(*rank_bounds(count, r, world)[::-1])
                    for r in range(world)] == expect


def test_rank_with_zero_rows_in_a_tiny_last_batch():
    x, y = _data(9)
    b = Batcher(x, y, 4, seed=0, rank=4, world=5)  # last global batch has 1 row
    lx, ly, count = b.batch(0, 2)
    assert count == 1 and lx.shape == (0, 3) and ly.shape == (0,)


def test_pure_function_of_seed_epoch_step():
    x, y = _data(100)
    a = Batcher(x, y, 10, seed=3, rank=1, world=3)
    b = Batcher(x, y, 10, seed=3, rank=1, world=3)
    forward = [a.batch(e, s)[1].copy() for e in range(3) for s in range(10)]
    # a "resumed" batcher asked out of order gives the same batches
    for e, s in [(2, 7), (0, 3), (1, 9), (0, 0), (2, 0)]:
        np.testing.assert_array_equal(b.batch(e, s)[1], forward[e * 10 + s])
    assert not np.array_equal(a.global_indices(0, 0), a.global_indices(1, 0))
    c = Batcher(x, y, 10, seed=4, rank=1, world=3)
    assert not np.array_equal(c.global_indices(0, 0), a.global_indices(0, 0))


def test_batches_reuse_preallocated_buffers():
    x, y = _data(100)
    b = Batcher(x, y, 16, seed=0, rank=0, world=2)
    x1, y1, _ = b.batch(0, 0)
    buf_x = x1
    for s in range(b.steps_per_epoch):
        xs, ys, _ = b.batch(0, s)
        assert np.shares_memory(xs, buf_x)
        assert not np.shares_memory(xs, x)


def test_regression_targets_and_readonly_inputs():
    x, _ = _data(20)
    y = np.arange(40, dtype=np.float32).reshape(20, 2)
    x.setflags(write=False)
    y.setflags(write=False)
    b = Batcher(x, y, 6, seed=1, rank=1, world=2)
    idx, count = b.indices(0, 1)
    lx, ly, c = b.batch(0, 1)
    np.testing.assert_array_equal(ly, y[idx])
    np.testing.assert_array_equal(lx, x[idx])


def test_bad_arguments():
    x, y = _data(5)
    with pytest.raises(DataError, match="rank 2 outside"):
        Batcher(x, y, 2, 0, rank=2, world=2)
    with pytest.raises(DataError, match="x has 5 rows but y has 4"):
        Batcher(x, y[:4], 2, 0)
    with pytest.raises(DataError, match="no rows"):
        Batcher(x[:0], y[:0], 2, 0)
    with pytest.raises(IndexError):
        Batcher(x, y, 2, 0).batch(0, 3)
