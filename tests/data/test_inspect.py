"""`distbackprop data inspect`: schema, rows, task, class counts, NaN counts, problems."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distbackprop.data import embedded_digits_path, format_inspect, inspect
from tests.data.conftest import make_table, write


def test_inspect_digits():
    d = inspect(str(embedded_digits_path()))
    json.dumps(d)
    assert d["rows"] == 1797 and d["format"] == "parquet" and d["files"] == 1
    assert d["task"] == "classification" and d["n_features"] == 64
    counts = pq.read_table(embedded_digits_path()).column("target").value_counts().to_pylist()
    assert d["class_counts"] == {str(c["values"]): c["counts"]
                                 for c in sorted(counts, key=lambda c: c["values"])}
    assert sum(d["class_counts"].values()) == 1797
    assert set(d["nan_counts"].values()) == {0} and d["problems"] == []
    text = format_inspect(d)
    assert "rows:     1797" in text and "target → classification, 10 classes" in text
    assert "pixel_63" in text and "problems: none" in text


def test_inspect_counts_nan_null_and_inf_per_column(tmp_path):
    t = make_table(30)
    f0 = t.column("f0").to_numpy().copy()
    f0[[1, 2, 3]] = [np.nan, np.inf, -np.inf]
    f1 = t.column("f1").to_pylist()
    f1[5] = None
    t = t.set_column(0, "f0", pa.array(f0)).set_column(1, "f1", pa.array(f1))
    vals = np.arange(30 * 2, dtype=np.float32)
    vals[[0, 1, 9]] = np.nan  # rows 0 (twice) and 4
    t = t.append_column("img", pa.FixedSizeListArray.from_arrays(pa.array(vals), 2))
    path = write(t, tmp_path / "d.parquet", row_group_size=7)
    d = inspect(str(path))
    assert d["nan_counts"] == {"f0": 3, "f1": 1, "f2": 0, "id": 0, "target": 0, "img": 2}
    assert d["row_groups"] == 5 and d["rows"] == 30
    assert {c["name"]: c["role"] for c in d["schema"]}["target"] == "target"
    assert "NaN/null" in format_inspect(d)


def test_inspect_regression_and_string_labels(tmp_path):
    y = np.arange(10.0) + 0.5  # non-integral: a CSV writes 1.0 as "1", read back as integer
    t = make_table(10).drop_columns(["target"]).append_column("y", pa.array(y))
    d = inspect(str(write(t, tmp_path / "r.csv")), target="y")
    assert d["task"] == "regression"
    assert d["target_summary"] == {"y": {"min": 0.5, "max": 9.5, "mean": 5.0}}
    s = make_table(6, labels=["b", "a", "b", "c", "b", "a"])
    d2 = inspect(str(write(s, tmp_path / "s.arrow")))
    assert d2["class_counts"] == {"a": 2, "b": 3, "c": 1}


def test_inspect_lists_problems_instead_of_raising(tmp_path):
    t = make_table(10)
    d = inspect(str(write(t, tmp_path / "d.parquet")), target="label")
    assert any("'label' not found" in p for p in d["problems"])
    assert d["features"] == ["f0", "f1", "f2", "id", "target"]
    f1 = [str(v) for v in t.column("f1").to_pylist()]
    f1[6] = "oops"
    d2 = inspect(str(write(t.set_column(1, "f1", pa.array(f1)), tmp_path / "b.csv")))
    assert f"data: column 'f1' of {tmp_path / 'b.csv'} is not numeric: row 6 holds 'oops' " \
        "(9 of 10 values are numbers)" in d2["problems"]
    assert "problems:\n  - " in format_inspect(d2)


def test_inspect_warns_about_columns_training_would_leave_out(tmp_path):
    t = make_table(10).append_column("name", pa.array([f"n{i}" for i in range(10)]))
    p = write(t, tmp_path / "d.parquet")
    d = inspect(str(p))
    assert d["problems"] == []
    assert d["warnings"] == [f"column 'name' (string) of {p} is not numeric: left out of the "
                             "features (name the features with --features to silence this)"]
    assert f"warning: column 'name' (string) of {p}" in format_inspect(d)

