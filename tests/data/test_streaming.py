"""Streaming mode: each rank reads only its row groups; equal step counts on every rank."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from distbackprop.data import DataError, StreamingBatcher, load_training_data
from distbackprop.data.streaming import holdout_mask
from tests.data.conftest import cfg, write

SIZES = [(50, 7), (37, 10), (64, 16)]  # (rows, row group size) per file: uneven pieces


def _dataset(tmp_path, regression: bool = False):
    start = 0
    for k, (n, rg) in enumerate(SIZES):
        ids = np.arange(start, start + n)
        target = pa.array(ids * 0.5) if regression else pa.array(ids % 4)
        write(pa.table({"id": pa.array(ids.astype(np.float64)), "target": target}),
              tmp_path / "dir" / f"part-{k}.parquet", row_group_size=rg)
        start += n
    return tmp_path / "dir", start


def _stream_cfg(path, **kw):
    return cfg(path, streaming=True, **kw)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_read_only_their_row_groups_and_take_equal_steps(tmp_path, world):
    path, n = _dataset(tmp_path)
    bundle = load_training_data(_stream_cfg(path))
    plan = bundle.stream
    assert bundle.x_train is None and plan.n_train == n == bundle.n_train
    assert len(plan.pieces) == 8 + 4 + 4
    B = 12
    ranks = [StreamingBatcher(plan, batch_size=B, rank=r, world=world, shuffle_buffer=20)
             for r in range(world)]
    steps = {b.steps_per_epoch for b in ranks}
    assert len(steps) == 1  # every rank takes the same number of steps
    S = steps.pop()
    assigned = [{(p.path, p.row_group) for p in b.assigned} for b in ranks]
    assert sum(len(a) for a in assigned) == len(plan.pieces)
    assert set().union(*assigned) == {(p.path, p.row_group) for p in plan.pieces}
    for b in ranks:
        assert S == min(rows // share for rows, share in zip(b.rank_rows, b.shares, strict=True))
    for epoch in (0, 1):
        emitted = []
        for r, b in enumerate(ranks):
            own = {int(i) for p in b.assigned for i in range(p.start, p.start + p.rows)}
            got = []
            for x, y, count in b.epoch(epoch):
                assert count == B
                assert x.shape == (b.shares[r], 1)
                np.testing.assert_array_equal(y, x[:, 0].astype(np.int64) % 4)
                got.extend(x[:, 0].astype(int).tolist())
            assert len(got) == S * b.shares[r]
            assert set(got) <= own  # rows only from this rank's own pieces
            emitted.extend(got)  # R_r − S·b_r of the rank's rows are left out this epoch
        assert len(emitted) == len(set(emitted))
    for b, own in zip(ranks, assigned, strict=True):
        read = set(b.pieces_read)
        assert read <= own  # the counter: only assigned row groups were ever read
        assert b.row_groups_read == len(b.pieces_read) <= 2 * len(own)
        b.close()


def test_world_one_reads_each_row_group_once_per_epoch(tmp_path):
    path, n = _dataset(tmp_path)
    plan = load_training_data(_stream_cfg(path)).stream
    b = StreamingBatcher(plan, batch_size=1, prefetch=False)
    assert b.steps_per_epoch == n
    ids = [int(x[0, 0]) for x, _, _ in b.epoch(0)]
    assert sorted(ids) == list(range(n))
    assert sorted(b.pieces_read) == sorted((p.path, p.row_group) for p in plan.pieces)
    assert ids != sorted(ids)  # shuffled


def test_resume_replays_the_same_batches(tmp_path):
    path, _ = _dataset(tmp_path)
    plan = load_training_data(_stream_cfg(path)).stream
    a = StreamingBatcher(plan, batch_size=10, rank=1, world=2)
    seq = [(e, s, a.batch(e, s)[0].copy()) for e in range(2) for s in range(a.steps_per_epoch)]
    b = StreamingBatcher(plan, batch_size=10, rank=1, world=2)
    for e, s, x in (seq[9], seq[3], seq[-1]):
        np.testing.assert_array_equal(b.batch(e, s)[0], x)
    assert not np.array_equal(seq[0][2], seq[a.steps_per_epoch][2])  # epochs reshuffle
    a.close()
    b.close()


def test_validation_rows_are_held_out_of_the_stream(tmp_path):
    path, n = _dataset(tmp_path)
    bundle = load_training_data(_stream_cfg(path, val_fraction=0.2, seed=3))
    val_ids = set(bundle.x_val[:, 0].astype(int).tolist())
    assert val_ids == set(np.flatnonzero(holdout_mask(np.arange(n), 3, 0.2)).tolist())
    assert 0 < len(val_ids) < n and bundle.n_train + len(val_ids) == n
    b = StreamingBatcher(bundle.stream, batch_size=4)
    seen = {int(v) for x, _, _ in b.epoch(0) for v in x[:, 0]}
    assert not seen & val_ids
    b.close()


def test_statistics_and_classes_match_the_in_memory_mode(tmp_path):
    path, _ = _dataset(tmp_path)
    mem = load_training_data(cfg(path, standardize=True))
    st = load_training_data(_stream_cfg(path, standardize=True))
    np.testing.assert_allclose(st.mean, mem.mean, rtol=1e-12)
    np.testing.assert_allclose(st.std, mem.std, rtol=1e-12)
    meta_st, meta_mem = st.model_meta(), mem.model_meta()
    for k in ("mean", "std"):
        del meta_st[k], meta_mem[k]
    assert st.classes == mem.classes and meta_st == meta_mem
    b = StreamingBatcher(st.stream, batch_size=8)
    x, _, _ = b.batch(0, 0)
    assert np.all(np.abs(x) < 2)  # standardized on the way
    b.close()


def test_streaming_regression(tmp_path):
    path, n = _dataset(tmp_path, regression=True)
    bundle = load_training_data(_stream_cfg(path))
    b = StreamingBatcher(bundle.stream, batch_size=6, rank=0, world=2)
    x, y, count = b.batch(0, 0)
    assert count == 6 and y.shape == (3, 1)
    np.testing.assert_allclose(y[:, 0], x[:, 0] * 0.5)
    b.close()


def test_too_few_pieces_for_the_workers(tmp_path):
    write(pa.table({"a": np.arange(10.0), "target": np.arange(10) % 2}),
          tmp_path / "one.parquet")
    plan = load_training_data(_stream_cfg(tmp_path / "one.parquet")).stream
    with pytest.raises(DataError, match=r"1 piece\(s\) \(row groups or files\) of "
                       r".*one\.parquet with \d+ training rows cannot give 2 worker\(s\)"):
        StreamingBatcher(plan, batch_size=4, world=2)


def test_csv_and_arrow_files_are_whole_pieces(tmp_path):
    for k in range(3):
        t = pa.table({"id": np.arange(k * 10, k * 10 + 10, dtype=np.float64),
                      "target": np.arange(10) % 2})
        write(t, tmp_path / "csv" / f"p{k}.csv")
    plan = load_training_data(_stream_cfg(tmp_path / "csv")).stream
    assert [p.row_group for p in plan.pieces] == [None] * 3
    b = [StreamingBatcher(plan, batch_size=4, rank=r, world=2) for r in range(2)]
    assert b[0].steps_per_epoch == b[1].steps_per_epoch
    for s in b:
        list(s.epoch(0))
        assert {p for p, _ in s.pieces_read} <= {p.path for p in s.assigned}
        s.close()
