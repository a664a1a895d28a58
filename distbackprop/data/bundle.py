"""Training and inference data as NumPy arrays: `load_training_data`, `prepare_inference`.

The training path: open the source → resolve columns (`schema.plan_columns`) →
read every file (errors name the file) → features ``(n, d)`` of the configured
dtype, targets (class indices or ``(n, k)`` floats) → bad rows refused or
dropped → validation split → standardization statistics over the training rows
only, applied to training and validation features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from distbackprop.data.errors import DataError
from distbackprop.data.schema import (
    ColumnPlan,
    audit_suspects,
    bad_rows_message,
    classes_of,
    encode_labels,
    feature_matrix,
    first_bad_feature,
    label_array,
    label_problems,
    label_values,
    nonfinite_rows,
    normalize_names,
    plan_columns,
    regression_targets,
)
from distbackprop.data.sources import Source, embedded_digits_path, locate, open_source, read_table
from distbackprop.data.standardize import RunningStats, standardize_

if TYPE_CHECKING:
    from distbackprop.config import TrainConfig
    from distbackprop.data.streaming import StreamPlan

DEFAULT_VAL_FRACTION = 0.1
META_KEYS = ("task", "classes", "feature_names", "feature_widths", "target_names", "mean", "std",
             "n_features", "n_outputs")


@dataclass
class DataBundle:
    """Everything training needs from the data.

    Shapes: ``x_train (n, d)`` of ``dtype``, already standardized; ``y_train``
    ``(n,)`` int64 class indices (classification) or ``(n, k)`` floats
    (regression); ``x_val``/``y_val`` likewise or None; ``mean (d,)``,
    ``std (d,)`` float64 with x_std = (x − mean) / std (zeros/ones when
    standardization is off). ``feature_names`` are source columns; column i
    contributes ``feature_widths[i]`` features (a fixed-size list is wider than 1).
    In streaming mode ``x_train``/``y_train`` are None and ``stream`` says how
    to read the training rows (`StreamingBatcher`).
    """

    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    task: str
    n_features: int
    n_outputs: int
    classes: list | None
    feature_names: list[str]
    target_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    source: str
    feature_widths: list[int] = field(default_factory=list)
    dtype: str = "float32"
    n_train: int = 0
    dropped_rows: int = 0
    notes: list[str] = field(default_factory=list)
    stream: StreamPlan | None = None

    def model_meta(self) -> dict[str, Any]:
        """What ``model.npz`` must carry for `prepare_inference` (keys `META_KEYS`).

        Every value is JSON-serialisable (``mean``/``std`` are lists of floats), as
        ``MLP.save`` stores meta as JSON.
        """
        return {
            "task": self.task,
            "classes": None if self.classes is None else list(self.classes),
            "feature_names": list(self.feature_names),
            "feature_widths": list(self.feature_widths),
            "target_names": list(self.target_names),
            "mean": np.asarray(self.mean, dtype=np.float64).tolist(),
            "std": np.asarray(self.std, dtype=np.float64).tolist(),
            "n_features": int(self.n_features),
            "n_outputs": int(self.n_outputs),
        }


@dataclass
class BadRows:
    """Rows refused for one reason: ``what`` (features / target 'y'), count, first location."""

    what: str
    count: int
    path: str
    row: int
    column: str | None = None

    def message(self, role: str) -> str:
        return bad_rows_message(role, self.what, self.count, self.path, self.row, self.column)


@dataclass
class Converted:
    """A table as NumPy: features ``(n, d)``, raw labels or ``(n, k)`` targets, bad-row mask."""

    x: np.ndarray
    labels: np.ndarray | None
    y: np.ndarray | None
    bad: np.ndarray
    reports: list[BadRows]


def convert_table(table: pa.Table, spans: list, plan: ColumnPlan, dtype: np.dtype | str,
                  role: str = "data") -> Converted:
    """Features and targets of ``table``; a row is bad when a feature or target is null,
    NaN or ±inf. Non-integral class labels raise at once (dropping would not fix them).
    """
    x = feature_matrix(table, plan, dtype)
    bad = nonfinite_rows(x)
    reports = []
    if bad.any():
        first = int(np.argmax(bad))
        reports.append(BadRows("features", int(bad.sum()), *locate(spans, first),
                               first_bad_feature(x, first, plan)))
    labels = y = None
    if plan.target_names and plan.task == "classification":
        name = plan.target_names[0]
        arr = label_array(table, name)
        bad_y, hard = label_problems(arr, name, spans, role)
        if hard:
            raise DataError(hard)
        if bad_y.any():
            reports.append(BadRows(f"target {name!r}", int(bad_y.sum()),
                                   *locate(spans, int(np.argmax(bad_y)))))
        labels = label_values(arr)
        bad |= bad_y
    elif plan.target_names:
        y = regression_targets(table, plan.target_names, dtype)
        bad_y = nonfinite_rows(y)
        if bad_y.any():
            first = int(np.argmax(bad_y))
            col = plan.target_names[int(np.flatnonzero(~np.isfinite(y[first]))[0])]
            reports.append(BadRows(f"target {col!r}", int(bad_y.sum()), *locate(spans, first)))
        bad |= bad_y
    return Converted(x, labels, y, bad, reports)


@dataclass
class Arrays:
    """One source read into NumPy: features, raw labels or regression targets.

    ``rows`` are the original row numbers kept (None when nothing was dropped);
    ``spans`` map original rows to files.
    """

    x: np.ndarray
    labels: np.ndarray | None
    y: np.ndarray | None
    dropped: int
    spans: list
    rows: np.ndarray | None = None

    def origin(self, i: int) -> tuple[str, int]:
        """(file, row in file) of kept row ``i``."""
        return locate(self.spans, int(self.rows[i]) if self.rows is not None else i)


def read_arrays(src: Source, plan: ColumnPlan, *, dtype: np.dtype | str, on_bad_rows: str,
                role: str = "data") -> Arrays:
    """Read ``plan``'s columns of every file into `Arrays`; apply the bad-row policy.

    ``error`` raises naming the count and the first bad row (file, row, column);
    ``drop`` removes the rows and counts them.
    """
    table, spans = read_table(src, plan.columns, role)
    if table.num_rows == 0:
        raise DataError(f"{role}: {src.path} has no rows")
    audit_suspects(table, plan, spans, role)
    conv = convert_table(table, spans, plan, dtype, role)
    del table
    if not conv.reports:
        return Arrays(conv.x, conv.labels, conv.y, 0, spans)
    if on_bad_rows != "drop":
        raise DataError([r.message(role) for r in conv.reports])
    keep = ~conv.bad
    if not keep.any():
        raise DataError(f"{role}: every row of {src.path} has a NaN, inf or missing value; "
                        "nothing is left after --on-bad-rows drop")
    return Arrays(conv.x[keep], None if conv.labels is None else conv.labels[keep],
                  None if conv.y is None else conv.y[keep], int(conv.bad.sum()), spans,
                  np.flatnonzero(keep))


def encode_or_raise(arrs: Arrays, classes: list, column: str, role: str) -> np.ndarray:
    """Class indices of ``arrs.labels``; a label outside ``classes`` is a `DataError`."""
    idx, unknown = encode_labels(arrs.labels, classes)
    if unknown.any():
        i = int(np.argmax(unknown))
        path, r = arrs.origin(i)
        shown = ", ".join(map(repr, classes[:20])) + (" …" if len(classes) > 20 else "")
        label = arrs.labels[i]
        label = label.item() if isinstance(label, np.generic) else label
        raise DataError(f"{role}: label {label!r} in column {column!r} at row {r} of "
                        f"{path} was never seen in training ({int(unknown.sum())} row(s); "
                        f"known classes: {shown})")
    return idx


def _compatible_plan(src: Source, plan: ColumnPlan, path: str, role: str) -> ColumnPlan:
    """The training plan applied to another source: same columns, same widths."""
    other = plan_columns(src.schema, source=path, target=plan.target_names,
                         features=plan.feature_names, task=plan.task,
                         partition_columns=src.partition_columns, role=role)
    if other.feature_widths != plan.feature_widths:
        diffs = [f"{c!r} has {w2} values, expected {w1}" for c, w1, w2 in
                 zip(plan.feature_names, plan.feature_widths, other.feature_widths, strict=True)
                 if w1 != w2]
        raise DataError(f"{role}: {path} gives {other.n_features} features but the model "
                        f"expects {plan.n_features} ({'; '.join(diffs)})")
    return other


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` sorted row indices: a seeded permutation's first round(n·f) are val.

    At least one validation row when ``fraction > 0``, at least one training row.
    """
    if fraction <= 0:
        return np.arange(n), np.arange(0)
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise DataError(f"val_fraction: {fraction} of {n} rows leaves no training rows")
    perm = np.random.default_rng([_seed(seed), 0x7A1]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _seed(seed: int) -> int:
    return int(seed) & 0xFFFFFFFFFFFFFFFF


def resolve_val_fraction(config: TrainConfig) -> float:
    if config.val_data is not None:
        if config.val_fraction:
            raise DataError("val_fraction: cannot be combined with val_data "
                            f"(got {config.val_fraction}); use one of them")
        return 0.0
    return DEFAULT_VAL_FRACTION if config.val_fraction is None else float(config.val_fraction)


def training_plan(config: TrainConfig) -> tuple[Source, ColumnPlan, str]:
    """Open ``config.data`` (or the embedded digits) and resolve its columns."""
    path = config.data if config.data is not None else str(embedded_digits_path())
    src = open_source(path, "data")
    features = normalize_names(config.features) or None
    plan = plan_columns(src.schema, source=path, target=config.target, features=features,
                        task=config.task, partition_columns=src.partition_columns)
    return src, plan, path


def load_training_data(config: TrainConfig) -> DataBundle:
    """Read, check, split and standardize the training data of ``config``.

    Uses ``config.data`` (the embedded digits when None), ``val_data`` /
    ``val_fraction`` (0.1 without val_data), ``target``, ``features``, ``task``,
    ``standardize``, ``on_bad_rows``, ``dtype``, ``seed``; with ``streaming``
    only statistics are gathered here (one pass) and ``bundle.stream`` is set.
    Raises `DataError` before anything is returned.
    """
    dtype = np.dtype(config.dtype)
    fraction = resolve_val_fraction(config)
    src, plan, path = training_plan(config)
    if config.streaming:
        from distbackprop.data.streaming import load_streaming
        return load_streaming(config, src, plan, path, fraction)

    arrs = read_arrays(src, plan, dtype=dtype, on_bad_rows=config.on_bad_rows)
    notes = list(plan.notes)
    if arrs.dropped:
        notes.append(f"dropped {arrs.dropped} row(s) of {path} with NaN, inf or missing values")
    classes = None
    if plan.task == "classification":
        classes = classes_of(arrs.labels)
        y_all = encode_or_raise(arrs, classes, plan.target_names[0], "data")
    else:
        y_all = arrs.y

    dropped = arrs.dropped
    if config.val_data is not None:
        x_train, y_train = arrs.x, y_all
        x_val, y_val, val_dropped = read_validation(config.val_data, plan, classes, dtype,
                                                    config.on_bad_rows)
        if val_dropped:
            notes.append(f"dropped {val_dropped} row(s) of {config.val_data} with NaN, inf or "
                         "missing values")
    else:
        train_idx, val_idx = split_indices(len(arrs.x), fraction, config.seed)
        if len(val_idx):
            x_train, y_train = arrs.x[train_idx], y_all[train_idx]
            x_val, y_val = arrs.x[val_idx], y_all[val_idx]
        else:
            x_train, y_train, x_val, y_val = arrs.x, y_all, None, None
    del arrs

    mean, std = _stats(x_train, config.standardize)
    if config.standardize:
        standardize_(x_train, mean, std)
        if x_val is not None:
            standardize_(x_val, mean, std)
    return DataBundle(
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, task=plan.task,
        n_features=plan.n_features,
        n_outputs=len(classes) if classes is not None else len(plan.target_names),
        classes=classes, feature_names=list(plan.feature_names),
        target_names=list(plan.target_names), mean=mean, std=std, source=path,
        feature_widths=list(plan.feature_widths), dtype=dtype.name, n_train=len(x_train),
        dropped_rows=dropped, notes=notes)


def _stats(x: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    d = x.shape[1]
    if not standardize:
        return np.zeros(d), np.ones(d)
    stats = RunningStats(d)
    stats.update_(x)
    return stats.finalize()


def read_validation(path: str, plan: ColumnPlan, classes: list | None, dtype: np.dtype,
                    on_bad_rows: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(x_val, y_val, dropped rows)`` from ``--val-data`` with the training columns/classes."""
    src = open_source(path, "val_data")
    vplan = _compatible_plan(src, plan, path, "val_data")
    arrs = read_arrays(src, vplan, dtype=dtype, on_bad_rows=on_bad_rows, role="val_data")
    if classes is not None:
        y = encode_or_raise(arrs, classes, plan.target_names[0], "val_data")
        return arrs.x, y, arrs.dropped
    return arrs.x, arrs.y, arrs.dropped


def prepare_inference(model_meta: dict[str, Any], path: str,
                      target: str | Sequence[str] | None = None, *, labels: bool = True,
                      dtype: np.dtype | str = np.float64, on_bad_rows: str = "error"
                      ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """``(x (n, d), y or None, feature_names)`` of ``path`` as the model saw its training data.

    Selects the saved feature columns, applies x_std = (x − mean) / std with the
    saved statistics, and maps labels through the saved class list (a label
    training never saw is a `DataError` naming it and its row). ``y`` is ``(n,)``
    int64 class indices or ``(n, k)`` floats, read from ``target`` (which must
    exist), or with ``target=None`` from the model's saved target column(s) when
    the file has them (else ``y`` is None). ``labels=False`` reads no labels
    (prediction).
    """
    meta = _normalized_meta(model_meta)
    src = open_source(path, "data")
    names = meta["feature_names"]
    targets = normalize_names(target)
    if not labels:
        targets = ()
    elif not targets:
        saved = tuple(meta.get("target_names") or ())
        targets = saved if saved and all(t in src.schema.names for t in saved) else ()
    missing = [c for c in names if c not in src.schema.names]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" …" if len(missing) > 5 else "")
        raise DataError(f"data: the model expects {meta['n_features']} features from "
                        f"{len(names)} column(s); {path} lacks {len(missing)} of them: {shown} "
                        f"(it has: {', '.join(src.schema.names[:12])})")
    plan = plan_columns(src.schema, source=path, target=targets or None, features=names,
                        task=meta["task"], partition_columns=src.partition_columns)
    widths = tuple(meta["feature_widths"]) or plan.feature_widths
    if plan.n_features != meta["n_features"] or plan.feature_widths != widths:
        raise DataError(f"data: {path} gives {plan.n_features} features "
                        f"(columns {', '.join(names[:5])}{' …' if len(names) > 5 else ''}) but "
                        f"the model expects {meta['n_features']}")
    if (targets and meta["task"] == "regression"
            and len(plan.target_names) != meta["n_outputs"]):
        raise DataError(f"data: {len(plan.target_names)} target column(s) given but the model "
                        f"predicts {meta['n_outputs']}")
    arrs = read_arrays(src, plan, dtype=dtype, on_bad_rows=on_bad_rows)
    standardize_(arrs.x, meta["mean"], meta["std"])
    y = None
    if targets and meta["task"] == "classification":
        y = encode_or_raise(arrs, meta["classes"], plan.target_names[0], "data")
    elif targets:
        y = arrs.y
    return arrs.x, y, list(names)


def _normalized_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Accept meta as stored (lists, 0-d arrays, arrays of str) and check its keys."""
    missing = [k for k in ("task", "feature_names", "mean", "std", "n_features") if k not in meta]
    if missing:
        raise DataError(f"model: metadata lacks {', '.join(missing)}")

    def plain(v: Any) -> Any:
        return v.tolist() if isinstance(v, np.ndarray) else v

    out = {k: plain(v) for k, v in meta.items()}
    out["feature_names"] = [str(c) for c in out["feature_names"]]
    out["feature_widths"] = [int(w) for w in (out.get("feature_widths") or [])]
    out["n_features"] = int(out["n_features"])
    out["n_outputs"] = int(out.get("n_outputs") or 0)
    out["mean"] = np.asarray(meta["mean"], dtype=np.float64).reshape(-1)
    out["std"] = np.asarray(meta["std"], dtype=np.float64).reshape(-1)
    if len(out["mean"]) != out["n_features"] or len(out["std"]) != out["n_features"]:
        raise DataError(f"model: mean/std have {len(out['mean'])}/{len(out['std'])} entries "
                        f"but n_features is {out['n_features']}")
    if out["task"] == "classification" and not out.get("classes"):
        raise DataError("model: a classification model's metadata lacks its classes")
    return out
