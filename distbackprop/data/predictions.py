"""``distbackprop predict``: a saved model's outputs on new data, written as Parquet."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distbackprop.atomic import atomic_path
from distbackprop.data.bundle import prepare_inference
from distbackprop.data.errors import DataError


def _softmax(z: np.ndarray) -> np.ndarray:
    """softmax(z)_j = exp(z_j − max z) / Σ_k exp(z_k − max z), row-wise."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def prediction_table(meta: dict[str, Any], y_hat: np.ndarray) -> pa.Table:
    """Columns: classification → ``prediction`` (original label), ``probability`` (of it),
    ``prob/<label>`` per class; regression → ``prediction`` (one target) or
    ``prediction/<target>`` per target.
    """
    y_hat = np.asarray(y_hat, dtype=np.float64)
    if meta.get("task") == "classification":
        classes = list(meta["classes"])
        if y_hat.shape[1] == 1:  # one logit (bce): p(class 1) = σ(z)
            p1 = 1.0 / (1.0 + np.exp(-y_hat[:, 0]))
            probs = np.stack([1.0 - p1, p1], axis=1)
        else:
            probs = _softmax(y_hat)
        idx = probs.argmax(axis=1)
        cols = {"prediction": pa.array([classes[i] for i in idx]),
                "probability": pa.array(probs[np.arange(len(idx)), idx])}
        for j, c in enumerate(classes[:probs.shape[1]]):
            cols[f"prob/{c}"] = pa.array(probs[:, j])
        return pa.table(cols)
    names = list(meta.get("target_names") or [])
    if y_hat.shape[1] == 1:
        return pa.table({"prediction": pa.array(y_hat[:, 0])})
    names = names if len(names) == y_hat.shape[1] else [str(j) for j in range(y_hat.shape[1])]
    return pa.table({f"prediction/{n}": pa.array(y_hat[:, j]) for j, n in enumerate(names)})


def write_predictions(model: Any, data: str, out: str | os.PathLike) -> int:
    """Predict every row of ``data`` with ``model`` (``.meta``, ``.dtype``, ``.predict``)
    and write `prediction_table` to ``out`` (Parquet, atomically); returns the row count.
    """
    x, _, _ = prepare_inference(model.meta, data, labels=False,
                                dtype=getattr(model, "dtype", np.float64))
    table = prediction_table(model.meta, model.predict(x))
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"out: cannot write {out}: {exc}") from exc
    return table.num_rows
