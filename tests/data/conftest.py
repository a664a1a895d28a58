"""Helpers for the data-plane tests: small tables written in every supported format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from distbackprop.config import TrainConfig


def make_table(n: int = 40, d: int = 3, labels=None, seed: int = 0) -> pa.Table:
    """Float features f0..f{d-1}, an ``id`` column (0..n-1) and a ``target`` column."""
    rng = np.random.default_rng(seed)
    cols = {f"f{j}": pa.array(rng.normal(j, 1 + j, n)) for j in range(d)}
    cols["id"] = pa.array(np.arange(n, dtype=np.int64))
    if labels is None:
        labels = rng.integers(0, 3, n)
    cols["target"] = pa.array(labels)
    return pa.table(cols)


def write(table: pa.Table, path: Path, **kw) -> Path:
    """Write ``table`` in the format the suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(table, path, **kw)
    elif name.endswith(".arrow"):
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
    elif name.endswith(".feather"):
        feather.write_feather(table, path)
    elif name.endswith(".csv"):
        pacsv.write_csv(table, path)
    else:
        raise AssertionError(path)
    return path


def cfg(path=None, **kw) -> TrainConfig:
    """A config for data tests: no validation split, no standardization unless asked."""
    base = {"val_fraction": 0.0, "standardize": False, "dtype": "float64"}
    base.update(kw)
    return TrainConfig(data=None if path is None else str(path), **base)


@pytest.fixture
def table() -> pa.Table:
    return make_table()
