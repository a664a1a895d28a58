"""history.parquet and memory.parquet: columns, values, atomic writes, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from distbackprop.config import ConfigError
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
    m.append(20, {0: {"rss_bytes": 110, "activation_bytes": 11, "shared_bytes": 4096},
                  1: {"rss_bytes": 210, "activation_bytes": 21, "shared_bytes": 4096}})
    path = m.write(tmp_path / "memory.parquet")
    d = read_columns(path)
    assert list(d) == list(MEMORY_COLUMNS)
    assert d["step"].tolist() == [10, 10, 20, 20]
    assert d["worker"].tolist() == [0, 1, 0, 1]
    assert d["rss_bytes"].tolist() == [100, 200, 110, 210]
    assert d["peak_rss_bytes"].tolist() == [150, 200, 110, 210]
    assert d["activation_bytes"].tolist() == [10, 20, 11, 21]
    assert d["shared_bytes"].tolist() == [0, 0, 4096, 4096]
    assert MemoryHistory().to_table().num_rows == 0


def test_resume_from_file_keeps_earlier_steps(tmp_path):
    rng = np.random.default_rng(4)
    w = HistoryWriter(LAYERS)
    w.append(synthetic_chunk(0, 10, [1.0, 2.0, 3.0], rng, skipped_steps=[4]))
    path = w.write(tmp_path / "history.parquet")
    r = HistoryWriter.from_file(path, LAYERS, before_step=6)
    assert len(r) == 6
    r.append(synthetic_chunk(6, 2, [1.0, 2.0, 3.0], rng))
    t = r.to_table()
    full = pq.read_table(path)
    assert t.column("step").to_pylist() == list(range(8))
    # sharpness is NaN when not measured (NaN ≠ NaN): compare it NaN-aware
    assert t.drop_columns(["sharpness"]).slice(0, 6).equals(
        full.drop_columns(["sharpness"]).slice(0, 6))
    assert np.isnan(t.column("sharpness").to_numpy()).all()
    assert len(HistoryWriter.from_file(path, LAYERS)) == 10
    # the trainer's resume path: extend a fresh writer in place
    e = HistoryWriter(LAYERS)
    e.extend_from_parquet(path, upto_step=3)
    assert e.to_table().column("step").to_pylist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="grad_norm/dense9"):
        HistoryWriter.from_file(path, [*LAYERS, "dense9"])
    (tmp_path / "bad.parquet").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="bad.parquet"):
        HistoryWriter(LAYERS).extend_from_parquet(tmp_path / "bad.parquet")
    m = MemoryHistory()
    m.append(5, {0: {"rss_bytes": 1, "activation_bytes": 2}})
    m.append(9, {0: {"rss_bytes": 3, "activation_bytes": 4}})
    mp = m.write(tmp_path / "memory.parquet")
    assert MemoryHistory.from_file(mp, before_step=6).to_table().num_rows == 1
    assert MemoryHistory.from_file(mp).to_table().equals(m.to_table())
