"""`write_predictions`: the predict command's Parquet output."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from distbackprop.data import load_training_data, prediction_table, write_predictions
from tests.data.conftest import cfg, make_table, write


class _Model:
    """Stands in for an MLP: a fixed linear map, enough to check the plumbing."""

    dtype = np.float64

    def __init__(self, meta, n_out):
        self.meta = meta
        self.n_out = n_out

    def predict(self, x):
        return np.column_stack([x[:, 3] * (k + 1) for k in range(self.n_out)])


def test_classification_predictions_use_original_labels(tmp_path):
    t = make_table(12, labels=["x", "y", "z"] * 4)
    path = write(t, tmp_path / "d.parquet")
    b = load_training_data(cfg(path))
    model = _Model(b.model_meta(), 3)
    out = tmp_path / "pred" / "p.parquet"
    assert write_predictions(model, str(path), out) == 12
    res = pq.read_table(out)
    assert res.column_names == ["prediction", "probability", "prob/x", "prob/y", "prob/z"]
    # the id feature grows along the rows, so the highest-weighted logit wins after row 0
    assert res.column("prediction").to_pylist()[1:] == ["z"] * 11
    p = np.column_stack([res.column(f"prob/{c}").to_numpy() for c in "xyz"])
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert [f.name for f in tmp_path.joinpath("pred").iterdir()] == ["p.parquet"]


def test_regression_and_binary_tables():
    reg = prediction_table({"task": "regression", "target_names": ["a", "b"]},
                           np.array([[1.0, 2.0]]))
    assert reg.column_names == ["prediction/a", "prediction/b"]
    one = prediction_table({"task": "regression", "target_names": ["a"]}, np.array([[3.0]]))
    assert one.column("prediction").to_pylist() == [3.0]
    binary = prediction_table({"task": "classification", "classes": ["no", "yes"]},
                              np.array([[2.0], [-2.0]]))
    assert binary.column("prediction").to_pylist() == ["yes", "no"]
    np.testing.assert_allclose(binary.column("prob/yes").to_numpy(), 1 / (1 + np.exp([-2, 2])))
