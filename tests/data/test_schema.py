"""Target/feature inference, label mapping, standardization statistics, validation split."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from distbackprop.data import (
    DEFAULT_VAL_FRACTION,
    META_KEYS,
    load_training_data,
    prepare_inference,
)
from distbackprop.data.standardize import RunningStats
from tests.data.conftest import cfg, make_table, write


def test_string_labels_become_sorted_class_indices_and_round_trip(tmp_path):
    labels = ["cat", "dog", "bird", "dog", "cat", "eel"] * 5
    t = make_table(30, labels=labels)
    path = write(t, tmp_path / "animals.parquet")
    b = load_training_data(cfg(path))
    assert b.task == "classification"
    assert b.classes == ["bird", "cat", "dog", "eel"]
    assert b.n_outputs == 4
    assert b.y_train.dtype == np.int64
    assert [b.classes[i] for i in b.y_train] == labels
    # the model's metadata carries the mapping; evaluation maps labels back the same way
    meta = json.loads(json.dumps(b.model_meta()))
    assert set(META_KEYS) <= set(meta)
    x, y, names = prepare_inference(meta, str(path), "target")
    np.testing.assert_array_equal(y, b.y_train)
    assert names == b.feature_names
    # without a target the saved target column is used when present; labels=False reads none
    np.testing.assert_array_equal(prepare_inference(meta, str(path))[1], b.y_train)
    assert prepare_inference(meta, str(path), labels=False)[1] is None
    unlabelled = write(t.drop_columns(["target"]), tmp_path / "unlabelled.parquet")
    assert prepare_inference(meta, str(unlabelled))[1] is None
    # a file holding a subset of the classes keeps the training indices
    sub = write(t.filter(pa.array([lab in ("eel", "dog") for lab in labels])),
                tmp_path / "sub.csv")
    _, y_sub, _ = prepare_inference(meta, str(sub), "target")
    assert set(y_sub.tolist()) == {b.classes.index("eel"), b.classes.index("dog")}


def test_integer_labels_keep_their_values_as_classes(tmp_path):
    t = make_table(12, labels=np.array([10, 3, 7] * 4, dtype=np.int32))
    b = load_training_data(cfg(write(t, tmp_path / "d.parquet")))
    assert b.classes == [3, 7, 10]
    np.testing.assert_array_equal(b.y_train, [2, 0, 1] * 4)


def test_float_target_is_regression_one_or_several_columns(tmp_path):
    t = make_table(20)
    rng = np.random.default_rng(1)
    t = t.drop_columns(["target"]).append_column("y", pa.array(rng.normal(size=20)))
    t = t.append_column("z", pa.array(rng.normal(size=20)))
    path = write(t, tmp_path / "r.parquet")
    b = load_training_data(cfg(path, target="y"))
    assert b.task == "regression" and b.y_train.shape == (20, 1) and b.n_outputs == 1
    assert "z" in b.feature_names and b.classes is None
    b2 = load_training_data(cfg(path, target=("y", "z")))
    assert b2.y_train.shape == (20, 2) and b2.n_outputs == 2
    np.testing.assert_array_equal(b2.y_train[:, 1], t.column("z").to_numpy())
    assert b2.target_names == ["y", "z"]
    x, y, _ = prepare_inference(b2.model_meta(), str(path), ("y", "z"))
    np.testing.assert_array_equal(y, b2.y_train)


def test_explicit_task_overrides_inference(tmp_path):
    t = make_table(12, labels=np.array([0.0, 1.0, 2.0] * 4))
    path = write(t, tmp_path / "d.parquet")
    assert load_training_data(cfg(path)).task == "regression"
    b = load_training_data(cfg(path, task="classification"))
    assert b.task == "classification" and b.classes == [0, 1, 2]
    t2 = make_table(12, labels=np.arange(12))
    b2 = load_training_data(cfg(write(t2, tmp_path / "i.parquet"), task="regression"))
    assert b2.y_train.dtype == np.float64 and b2.y_train.shape == (12, 1)


def test_fixed_size_list_features_and_nested_lists(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.random((10, 6), dtype=np.float32)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), 6)
    nested = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), 3), 2)
    y = pa.array(np.arange(10) % 2)
    for name, col in (("flat", flat), ("nested", nested)):
        path = write(pa.table({"img": col, "target": y}), tmp_path / f"{name}.parquet")
        b = load_training_data(cfg(path))
        assert b.feature_names == ["img"] and b.feature_widths == [6] and b.n_features == 6
        np.testing.assert_array_equal(b.x_train, img.astype(np.float64))
        x, _, _ = prepare_inference(b.model_meta(), str(path))
        np.testing.assert_array_equal(x, img.astype(np.float64))


def test_mixed_scalar_and_list_columns(tmp_path):
    img = np.arange(20, dtype=np.float32).reshape(5, 4)
    t = pa.table({"a": pa.array(np.arange(5.0)),
                  "img": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), 4),
                  "target": pa.array([0, 1, 0, 1, 0])})
    b = load_training_data(cfg(write(t, tmp_path / "m.parquet")))
    assert b.n_features == 5
    np.testing.assert_array_equal(b.x_train[:, 1:], img)
    np.testing.assert_array_equal(b.x_train[:, 0], np.arange(5.0))


def test_default_features_leave_out_text_columns_and_explicit_features_select(tmp_path):
    t = make_table(12).append_column("name", pa.array([f"row {i}" for i in range(12)]))
    path = write(t, tmp_path / "d.csv")
    b = load_training_data(cfg(path))
    assert b.feature_names == ["f0", "f1", "f2", "id"]
    assert [w for w in b.warnings if "'name'" in w and str(path) in w] == b.warnings
    assert len(b.warnings) == 1 and "left out of the features" in b.warnings[0]
    b2 = load_training_data(cfg(path, features=("f2", "f0")))
    assert b2.feature_names == ["f2", "f0"]
    assert b2.warnings == []  # the user chose the features: nothing was left out silently
    np.testing.assert_array_equal(b2.x_train[:, 0], t.column("f2").to_numpy())


def test_standardization_uses_training_rows_only(tmp_path):
    t = make_table(200, d=3)
    t = t.append_column("const", pa.array(np.full(200, 7.5)))
    path = write(t, tmp_path / "d.parquet")
    raw = load_training_data(cfg(path, val_fraction=0.25, standardize=False))
    b = load_training_data(cfg(path, val_fraction=0.25, standardize=True))
    # same split, so the raw training rows are the pre-standardization training rows
    np.testing.assert_allclose(b.mean, raw.x_train.mean(axis=0), rtol=1e-12, atol=1e-12)
    std = raw.x_train.std(axis=0)
    const = b.feature_names.index("const")
    np.testing.assert_allclose(np.delete(b.std, const), np.delete(std, const), rtol=1e-12)
    assert b.std[const] == 1.0
    np.testing.assert_allclose(b.x_train, (raw.x_train - b.mean) / b.std, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(b.x_val, (raw.x_val - b.mean) / b.std, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.x_train.mean(axis=0), 0, atol=1e-12)
    assert np.all(b.x_train[:, const] == 0)
    # the validation rows did not enter the statistics
    all_rows = np.vstack([raw.x_train, raw.x_val])
    assert not np.allclose(b.mean, all_rows.mean(axis=0))
    # standardization off: identity statistics, raw values
    np.testing.assert_array_equal(raw.mean, 0)
    np.testing.assert_array_equal(raw.std, 1)
    # inference applies the saved statistics
    x, _, _ = prepare_inference(b.model_meta(), str(path))
    np.testing.assert_allclose(x, (np.vstack([raw.x_train, raw.x_val])[np.argsort(
        np.concatenate([raw.x_train[:, 3], raw.x_val[:, 3]]))] - b.mean) / b.std,
        rtol=1e-12, atol=1e-12)


def test_running_stats_merge_equals_whole():
    rng = np.random.default_rng(3)
    x = rng.normal(1e3, 2.0, (10_000, 4))
    s = RunningStats(4)
    for part in np.array_split(x, [1, 77, 5000, 5001]):
        s.update_(part)
    mean, std = s.finalize()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-10)


def test_validation_split_is_deterministic_disjoint_and_covering():
    b1 = load_training_data(cfg(None, val_fraction=None, seed=5))
    b2 = load_training_data(cfg(None, val_fraction=None, seed=5))
    b3 = load_training_data(cfg(None, val_fraction=None, seed=6))
    assert len(b1.x_val) == round(1797 * DEFAULT_VAL_FRACTION) == 180
    assert len(b1.x_train) + len(b1.x_val) == 1797 == b1.n_train + 180
    np.testing.assert_array_equal(b1.x_val, b2.x_val)
    np.testing.assert_array_equal(b1.y_train, b2.y_train)
    assert not np.array_equal(b1.x_val, b3.x_val)
    rows = {r.tobytes() for r in np.vstack([b1.x_train, b1.x_val])}
    assert len(rows) == len({r.tobytes() for r in load_training_data(cfg()).x_train})
    none = load_training_data(cfg(None, val_fraction=0.0))
    assert none.x_val is None and none.y_val is None


def test_val_data_file(tmp_path):
    t = make_table(40)
    train = write(t.slice(0, 30), tmp_path / "train.parquet")
    val = write(t.slice(30), tmp_path / "val.csv")
    b = load_training_data(cfg(train, val_fraction=None, val_data=str(val)))
    assert len(b.x_train) == 30 and len(b.x_val) == 10
    np.testing.assert_array_equal(b.y_val, t.column("target").to_numpy()[30:])


def test_dtype_follows_config():
    assert load_training_data(cfg(None, dtype="float32")).x_train.dtype == np.float32
    b = load_training_data(cfg(None, dtype="float64", val_fraction=0.1, standardize=True))
    assert b.x_train.dtype == b.x_val.dtype == np.float64


@pytest.mark.parametrize("streaming", [False, True])
def test_dropping_bad_rows_counts_them(tmp_path, streaming):
    t = make_table(20)
    f0 = t.column("f0").to_numpy().copy()
    f0[[3, 11]] = np.nan
    t = t.set_column(0, "f0", pa.array(f0))
    labels = t.column("target").to_pylist()
    labels[5] = None
    t = t.set_column(t.schema.get_field_index("target"), "target", pa.array(labels))
    b = load_training_data(cfg(write(t, tmp_path / "d.parquet"), on_bad_rows="drop",
                               streaming=streaming))
    assert b.dropped_rows == 3 and b.n_train == 17
    assert [w for w in b.warnings if w.startswith("dropped 3 row(s) of ")] == b.warnings
    assert len(b.warnings) == 1 and "d.parquet" in b.warnings[0]
    assert b.notes == []
    if not streaming:
        assert sorted(b.x_train[:, 3].tolist()) == [i for i in range(20) if i not in (3, 5, 11)]
