"""history.parquet and memory.parquet: columns, values, atomic writes, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from distbackprop.metrics.health import PHASES
from distbackprop.metrics.history import (
    MEMORY_COLUMNS,
    HistoryWriter,
    MemoryHistory,
    history_columns,
    read_columns,
)
from tests.metrics.synth import LAYERS, synthetic_chunk

CONTRACT_COLUMNS = ["step", "epoch", "loss", "grad_global_norm", "lr", "skipped",
                    "step_seconds"]


def test_history_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [synthetic_chunk(0, 7, [1.0, 1e-9, 10.0], rng, skipped_steps=[2]),
              synthetic_chunk(7, 5, [2.0, 1e-8, 20.0], rng, nonfinite_steps=[1])]
    w = HistoryWriter(LAYERS)
    for c in chunks:
        w.append(c)
    chunks[0]["loss"][:] = -1.0            # the writer copied: caller may reuse buffers
    assert len(w) == 12
    path = w.write(tmp_path / "run" / "history.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["history.parquet"]   # no temp
    table = pq.read_table(path)
    cols = table.column_names
    assert cols == history_columns(LAYERS)
    for c in CONTRACT_COLUMNS:
        assert c in cols
    for layer in LAYERS:
        assert f"grad_norm/{layer}" in cols and f"update_ratio/{layer}" in cols
    for p in PHASES:
        assert f"time/{p}" in cols
    assert "grad_max_abs" in cols and "nonfinite" in cols
    d = read_columns(path)
    assert d["step"].tolist() == list(range(12))
    assert d["step"].dtype == np.int64 and d["skipped"].dtype == bool
    assert d["skipped"].tolist() == [False, False, True] + [False] * 9
    assert d["nonfinite"].tolist() == [0] * 8 + [1] + [0] * 3
    assert d["loss"][0] == 1.0
    np.testing.assert_array_equal(d["grad_norm/dense1"],
                                  np.concatenate([c["grad_norm"][:, 1] for c in chunks]))
    np.testing.assert_array_equal(d["time/allreduce"],
                                  np.concatenate([c["phase_seconds"][:, 3] for c in chunks]))
    np.testing.assert_array_equal(d["update_ratio/dense2"],
                                  np.concatenate([c["update_ratio"][:, 2] for c in chunks]))
    # rewriting replaces the file
    w.append(synthetic_chunk(12, 3, [1, 1, 1], rng))
    w.write(path)
    assert pq.read_table(path).num_rows == 15


def test_empty_history_has_the_columns(tmp_path):
    t = HistoryWriter(LAYERS).to_table()
    assert t.num_rows == 0 and t.column_names == history_columns(LAYERS)


def test_history_rejects_bad_chunks():
    w = HistoryWriter(LAYERS)
    good = synthetic_chunk(0, 3, [1, 1, 1], np.random.default_rng(0))
    bad = dict(good)
    del bad["lr"]
    with pytest.raises(ValueError, match="'lr'"):
        w.append(bad)
    bad = dict(good, grad_norm=np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"grad_norm.*\(3, 3\)"):
        w.append(bad)
    assert len(w) == 0


def test_memory_history_round_trip(tmp_path):
    m = MemoryHistory()
    m.append(10, {1: {"rss_bytes": 200, "activation_bytes": 20},
                  0: {"rss_bytes": 100, "activation_bytes": 10, "peak_rss_bytes": 150}})
    m.append(20, {0: {"rss_bytes": 110, "activation_bytes": 11},
                  1: {"rss_bytes": 210, "activation_bytes": 21}})
    path = m.write(tmp_path / "memory.parquet")
    d = read_columns(path)
    assert list(d) == list(MEMORY_COLUMNS)
    assert d["step"].tolist() == [10, 10, 20, 20]
    assert d["worker"].tolist() == [0, 1, 0, 1]
    assert d["rss_bytes"].tolist() == [100, 200, 110, 210]
    assert d["peak_rss_bytes"].tolist() == [150, 200, 110, 210]
    assert d["activation_bytes"].tolist() == [10, 20, 11, 21]
    assert MemoryHistory().to_table().num_rows == 0
