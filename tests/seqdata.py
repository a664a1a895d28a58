"""Small sequence datasets as Parquet for the RNN tests (x: T steps × F features per row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def sequence_column(x: np.ndarray, nested_lists: bool = False) -> pa.Array:
    """(n, T, F) → fixed_size_list<fixed_size_list<double, F>, T>, or list<list<double>>."""
    n, T, F = x.shape
    if nested_lists:
        return pa.array([[list(map(float, step)) for step in row] for row in x],
                        type=pa.list_(pa.list_(pa.float64())))
    inner = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), F)
    return pa.FixedSizeListArray.from_arrays(inner, T)


def write_sequences(path: str | Path, n: int = 96, T: int = 12, F: int = 3,
                    target: str = "last", seed: int = 0, nested_lists: bool = False) -> Path:
    """Random sequences with a target that depends on early steps (so BPTT matters):
    ``last``: class = sign of Σ_t x_{t,0} over the first half (int64);
    ``every``: y_t = running mean of x_{·,0} up to t (fixed_size_list<double, T>)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, T, F))
    if target == "last":
        y = pa.array((x[:, : T // 2, 0].sum(axis=1) > 0).astype(np.int64))
    else:
        run = np.cumsum(x[:, :, 0], axis=1) / np.arange(1, T + 1)
        y = pa.FixedSizeListArray.from_arrays(pa.array(run.reshape(-1)), T)
    path = Path(path)
    pq.write_table(pa.table({"x": sequence_column(x, nested_lists), "target": y}), path)
    return path
