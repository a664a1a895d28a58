"""Reading a source into arrays, shared by in-memory (`bundle`) and streaming loading.

`DataBundle` is what loading returns; `convert_table` turns one table (a whole
source or one streamed piece) into features, targets and a bad-row mask;
`read_arrays` applies the bad-row policy to a whole source; `read_validation`
reads ``--val-data`` with the training columns and classes. Both loaders import
from here, and nothing here imports them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distbackprop.atomic import atomic_path
from distbackprop.data.errors import DataError
from distbackprop.data.schema import (
    VARIABLE,
    ColumnPlan,
    audit_suspects,
    bad_rows_message,
    encode_labels,
    feature_matrix,
    first_bad_feature,
    label_array,
    label_problems,
    label_values,
    nonfinite_rows,
    plan_columns,
    regression_targets,
    sequence_shape,
)
from distbackprop.data.sources import Source, locate, open_source, read_table

if TYPE_CHECKING:
    from distbackprop.data.streaming import StreamPlan

META_KEYS = ("task", "classes", "feature_names", "feature_widths", "target_names", "mean", "std",
             "n_features", "n_outputs", "sequence")


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

    ``warnings`` list whatever makes training differ from what the data holds
    (a column left out of the features, rows dropped, a class with no training
    rows), each naming the column, file or count; the CLI shows them even with
    ``--quiet``. ``notes`` are informational only.
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
    warnings: list[str] = field(default_factory=list)
    stream: StreamPlan | None = None
    # (T steps, F features) when the one feature column is a sequence: x rows are x[t·F + f].
    sequence: tuple[int, int] | None = None

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
            "sequence": None if self.sequence is None else [int(v) for v in self.sequence],
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
            j = int(np.flatnonzero(~np.isfinite(y[first]))[0])
            # a per-step target (one list column): name the step
            col = plan.target_names[j] if y.shape[1] == len(plan.target_names) else \
                f"{plan.target_names[0]}[step {j}]"
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
    plan: ColumnPlan | None = None  # the plan with list<list> sequence widths resolved

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
    if VARIABLE in plan.feature_widths:
        table, plan = resolve_sequences(table, plan, spans, role)
    audit_suspects(table, plan, spans, role)
    conv = convert_table(table, spans, plan, dtype, role)
    del table
    if not conv.reports:
        return Arrays(conv.x, conv.labels, conv.y, 0, spans, plan=plan)
    if on_bad_rows != "drop":
        raise DataError([r.message(role) for r in conv.reports])
    keep = ~conv.bad
    if not keep.any():
        raise DataError(f"{role}: every row of {src.path} has a NaN, inf or missing value; "
                        "nothing is left after --on-bad-rows drop")
    return Arrays(conv.x[keep], None if conv.labels is None else conv.labels[keep],
                  None if conv.y is None else conv.y[keep], int(conv.bad.sum()), spans,
                  np.flatnonzero(keep), plan)


def _lengths(arr: pa.Array) -> np.ndarray:
    """Per-row list lengths (null rows: -1)."""
    return pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)


def _fixed_sequence(arr: pa.Array, name: str, spans: list, role: str) -> pa.Array:
    """list<list<number>> → fixed_size_list<fixed_size_list<float64, F>, T>; T and F from the
    first row, and every other row must match (a ragged row is named with its length)."""
    outer = _lengths(arr)
    T = int(outer[0])
    bad = np.flatnonzero(outer != T)
    if T <= 0 or len(bad):
        r = int(bad[0]) if len(bad) else 0
        path, fr = locate(spans, r)
        what = "is missing (null)" if outer[r] < 0 else f"has {int(outer[r])} steps"
        raise DataError(f"{role}: sequence column {name!r}: row {fr} of {path} {what}, but "
                        f"row 0 has {T} steps; every row needs the same T > 0 "
                        f"({len(bad)} ragged row(s))")
    steps = arr.flatten()  # (n·T) inner lists, row-major
    if pa.types.is_fixed_size_list(steps.type):
        F = steps.type.list_size
    else:
        inner = _lengths(steps)
        F = int(inner[0])
        bad = np.flatnonzero(inner != F)
        if F <= 0 or len(bad):
            i = int(bad[0]) if len(bad) else 0
            r, t = divmod(i, T)
            path, fr = locate(spans, r)
            what = "is missing (null)" if inner[i] < 0 else f"has {int(inner[i])} features"
            raise DataError(f"{role}: sequence column {name!r}: row {fr} of {path}, step {t} "
                            f"{what}, but step 0 of row 0 has {F}; every step needs the same "
                            "F > 0")
    values = pc.cast(steps.flatten(), pa.float64())
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(values, F), T)


def resolve_sequences(table: pa.Table, plan: ColumnPlan, spans: list, role: str = "data"
                      ) -> tuple[pa.Table, ColumnPlan]:
    """Turn each list<list<number>> feature column (width `VARIABLE` in the plan) into a fixed
    T×F column; returns the table and the plan with the widths T·F (and `sequence`)."""
    widths = list(plan.feature_widths)
    for i, (name, w) in enumerate(zip(plan.feature_names, widths, strict=True)):
        if w != VARIABLE:
            continue
        fixed = _fixed_sequence(table.column(name).combine_chunks(), name, spans, role)
        table = table.set_column(table.schema.get_field_index(name), name, fixed)
        widths[i] = fixed.type.list_size * fixed.type.value_type.list_size
    seq = sequence_shape(table.schema.field(plan.feature_names[0]).type) \
        if len(plan.feature_names) == 1 else None
    return table, dataclasses.replace(plan, feature_widths=tuple(widths), sequence=seq)


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


def dropped_warning(count: int, path: str) -> str:
    """The warning for ``count`` rows of ``path`` removed by ``--on-bad-rows drop``."""
    return (f"dropped {count} row(s) of {path} with NaN, inf or missing values "
            "(--on-bad-rows drop); they are not trained on")


def untrained_class_warnings(y_train: np.ndarray, classes: list, column: str,
                             path: str) -> list[str]:
    """One warning naming the classes of ``column`` that no training row holds.

    ``y_train`` holds class indices into ``classes``; a class seen only among the
    validation rows gets an output the model is never trained to produce.
    """
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts[:len(classes)] == 0)]
    if not empty:
        return []
    shown = ", ".join(map(repr, empty[:10])) + (" …" if len(empty) > 10 else "")
    return [f"{len(empty)} class(es) of target column {column!r} in {path} have no training "
            f"rows (only validation rows hold them): {shown}; the model cannot learn them"]


def compatible_plan(src: Source, plan: ColumnPlan, path: str, role: str) -> ColumnPlan:
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


def read_validation(path: str, plan: ColumnPlan, classes: list | None, dtype: np.dtype,
                    on_bad_rows: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(x_val, y_val, dropped rows)`` from ``--val-data`` with the training columns/classes."""
    src = open_source(path, "val_data")
    vplan = compatible_plan(src, plan, path, "val_data")
    arrs = read_arrays(src, vplan, dtype=dtype, on_bad_rows=on_bad_rows, role="val_data")
    if classes is not None:
        y = encode_or_raise(arrs, classes, plan.target_names[0], "val_data")
        return arrs.x, y, arrs.dropped
    return arrs.x, arrs.y, arrs.dropped


def write_parquet(path: str | os.PathLike, columns: dict[str, np.ndarray]) -> None:
    """Columns of equal length as a Parquet file (synthetic data for benchmarks and tests)."""
    import pyarrow.parquet as pq
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def write_sequence_parquet(path: str | os.PathLike, x: np.ndarray, y: np.ndarray,
                           feature: str = "x", target: str = "target") -> None:
    """Sequences as Parquet: ``x (n, T, F)`` → a fixed_size_list<fixed_size_list<float, F>, T>
    column; ``y (n,)`` → a scalar target, ``y (n, T)`` → fixed_size_list<float, T> (a target
    per step, ``--sequence-target every``)."""
    import pyarrow.parquet as pq
    x = np.ascontiguousarray(x)
    n, T, F = x.shape
    cols = {feature: pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), F), T)}
    y = np.ascontiguousarray(y)
    cols[target] = pa.array(y) if y.ndim == 1 else \
        pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), y.shape[1])
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)
