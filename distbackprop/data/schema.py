"""Which columns are the target and the features, and turning them into NumPy arrays.

Rules for ``--target``, ``--features`` and ``--task``:

* task: ``classification`` when the (single) target is integer, string, boolean
  or dictionary-encoded; ``regression`` when the target column(s) are floating
  point. An explicit ``--task`` overrides (a float target may be classified when
  every value is integral; several target columns mean regression).
* features: the named columns, or by default every other column that is numeric
  or a fixed-size list of numbers (``list<float>[784]``, nested fixed-size lists
  are flattened row-major). Hive partition keys are not default features.
  Default inference leaves out columns that hold no numbers (ids, names,
  dates); a *string* column whose values are mostly numbers is a broken numeric
  column and is refused, naming the first row that is not a number.
  Variable-length lists are refused: a feature vector needs a fixed width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distbackprop.data.errors import DataError
from distbackprop.data.sources import locate

TASKS = ("classification", "regression")
_NUMBER_RE = r"^\s*[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)\s*$"
_BLOCK_ROWS = 1 << 16


def _is_numeric(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_numeric(t.value_type)
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_decimal(t))


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_varlist(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t))


def fixed_width(t: pa.DataType) -> int | None:
    """Number of features a column of type ``t`` yields, or None if it is not a feature type."""
    if _is_numeric(t):
        return 1
    if pa.types.is_fixed_size_list(t):
        inner = fixed_width(t.value_type)
        return None if inner is None else t.list_size * inner
    return None


VARIABLE = -1  # width of a list<list<number>> sequence column until its rows are read


def sequence_shape(t: pa.DataType) -> tuple[int, int] | None:
    """(T steps, F features) of a sequence column type: fixed_size_list<fixed_size_list<
    number, F>, T> → (T, F); fixed_size_list<number, T> → (T, 1); else None."""
    if not pa.types.is_fixed_size_list(t):
        return None
    inner = t.value_type
    if _is_numeric(inner):
        return t.list_size, 1
    if pa.types.is_fixed_size_list(inner) and _is_numeric(inner.value_type):
        return t.list_size, inner.list_size
    return None


def is_var_sequence(t: pa.DataType) -> bool:
    """list<list<number>> (or list<fixed_size_list<number, F>>): a sequence whose T and F
    are read from the rows (`tables.resolve_sequences`, which refuses ragged rows)."""
    if not _is_varlist(t):
        return False
    inner = t.value_type
    return ((_is_varlist(inner) or pa.types.is_fixed_size_list(inner))
            and _is_numeric(inner.value_type))


def is_list_target(t: pa.DataType) -> bool:
    """A per-step target: fixed_size_list<float, T> or list<float> (``--sequence-target
    every``)."""
    return ((pa.types.is_fixed_size_list(t) or _is_varlist(t))
            and pa.types.is_floating(t.value_type))


def _is_label(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_label(t.value_type)
    return pa.types.is_integer(t) or pa.types.is_boolean(t) or _is_string(t)


@dataclass(frozen=True)
class ColumnPlan:
    """The resolved roles of a dataset's columns.

    ``feature_names`` are source columns; column ``i`` contributes
    ``feature_widths[i]`` consecutive features, so ``n_features = sum(widths)``.
    ``suspects`` are string columns default inference left out, to be checked
    once their values are read (`audit_suspects`). ``warnings`` name each column
    default inference left out (it changes what is trained); ``notes`` are
    informational (partition keys, which are left out by rule).
    """

    task: str
    target_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    feature_widths: tuple[int, ...]
    ignored: tuple[str, ...] = ()
    suspects: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())
    # (T, F) when the one feature column is a sequence (see `sequence_shape`), else None.
    sequence: tuple[int, int] | None = None
    # values per row of the target: len(target_names), or T for one fixed_size_list<float, T>
    # target (a target per step); None for a list<float> target until its rows are read
    target_width: int | None = None

    @property
    def n_features(self) -> int:
        return int(sum(self.feature_widths))

    @property
    def columns(self) -> list[str]:
        """Columns to read: features, then targets, then suspects."""
        out: list[str] = []
        for c in (*self.feature_names, *self.target_names, *self.suspects):
            if c not in out:
                out.append(c)
        return out

    def feature_label(self, index: int) -> str:
        """Name of feature ``index`` in messages: the column, with ``[k]`` inside a list."""
        for name, width in zip(self.feature_names, self.feature_widths, strict=True):
            # a T×F sequence names step and feature (F = 1: the index is the step)
            if index < width and self.sequence is not None and self.sequence[1] > 1:
                step, f = divmod(index, self.sequence[1])  # row-major: x[t·F + f]
                return f"{name}[step {step}, feature {f}]"
            if index < width:
                return name if width == 1 else f"{name}[{index}]"
            index -= width
        return f"feature {index}"


def normalize_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"a,b"`` / ``["a", "b"]`` / ``"a"`` → ``("a", "b")``; None → ()."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    return tuple(str(v) for v in value)


def plan_columns(schema: pa.Schema, *, source: str, target: str | Sequence[str] | None,
                 features: Sequence[str] | None = None, task: str | None = None,
                 partition_columns: Sequence[str] = (), role: str = "data") -> ColumnPlan:
    """Resolve target, task and features from ``schema``; every problem reported at once.

    ``target=None`` plans features only (prediction without labels); then
    ``task`` must be given and ``target_names`` is empty.
    """
    problems: list[str] = []
    names = schema.names
    targets = normalize_names(target)
    if task is not None and task not in TASKS:
        problems.append(f"task: {task!r} is not one of {', '.join(TASKS)}")
    present_targets, found = _find_targets(names, targets, source, role)
    problems.extend(found)
    resolved, found = _resolve_task(schema, present_targets, task, source, role)
    problems.extend(found)

    if features:
        chosen = _named_features(schema, features, targets, source, role)
    else:
        chosen = _inferred_features(schema, set(targets) | set(partition_columns), source, role)
    problems.extend(chosen.problems)
    if not features and not chosen.names and not problems:
        problems.append(f"{role}: {source} has no numeric feature columns "
                        f"(columns: {_preview(names)})")
    if any(w == 0 for w in chosen.widths):
        zero = [c for c, w in zip(chosen.names, chosen.widths, strict=True) if w == 0]
        problems.append(f"{role}: feature column(s) {', '.join(map(repr, zero))} in {source} "
                        "have zero width")
    if problems:
        raise DataError(problems)
    warnings = tuple(f"column {c!r} ({schema.field(c).type}) of {source} is not numeric: "
                     "left out of the features (name the features with --features to "
                     "silence this)" for c in (*chosen.ignored, *chosen.suspects))
    parts = [c for c in partition_columns if c in names and c not in targets and not features]
    notes = tuple(f"partition column {c!r} of {source} is not a feature (name it in --features "
                  "to use it)" for c in parts)
    sequence = None
    if len(chosen.names) == 1:
        sequence = sequence_shape(schema.field(chosen.names[0]).type)
    return ColumnPlan(resolved, tuple(present_targets), tuple(chosen.names),
                      tuple(chosen.widths), tuple(chosen.ignored), tuple(chosen.suspects),
                      notes, warnings, sequence, _target_width(schema, present_targets))


def _target_width(schema: pa.Schema, targets: Sequence[str]) -> int | None:
    if len(targets) == 1 and is_list_target(schema.field(targets[0]).type):
        t = schema.field(targets[0]).type
        return t.list_size if pa.types.is_fixed_size_list(t) else None
    return len(targets)


def _find_targets(names: Sequence[str], targets: Sequence[str], source: str,
                  role: str) -> tuple[list[str], list[str]]:
    """``(target columns present in the schema, a problem per missing one)``."""
    problems = [f"{role}: target column {t!r} not found in {source} "
                f"(columns: {_preview(names)})" for t in targets if t not in names]
    return [t for t in targets if t in names], problems


def _resolve_task(schema: pa.Schema, present_targets: list[str], task: str | None,
                  source: str, role: str) -> tuple[str, list[str]]:
    """``(task, problems)``: ``task`` or the one the target types imply, checked against them."""
    if not present_targets:
        return task or "classification", []
    problems: list[str] = []
    types = [schema.field(t).type for t in present_targets]
    resolved = task
    if resolved is None:
        if len(types) == 1 and _is_label(types[0]):
            resolved = "classification"
        elif all(_is_numeric(tp) for tp in types) or (len(types) == 1
                                                     and is_list_target(types[0])):
            resolved = "regression"
    if resolved == "classification":
        if len(present_targets) > 1:
            problems.append(f"{role}: classification takes one target column, got "
                            f"{', '.join(map(repr, present_targets))} in {source}")
        elif not (_is_label(types[0]) or pa.types.is_floating(types[0])):
            problems.append(f"{role}: target column {present_targets[0]!r} in {source} has "
                            f"type {types[0]}, which cannot be a class label")
    elif resolved == "regression":
        for t, tp in zip(present_targets, types, strict=True):
            if not _is_numeric(tp) and not (len(types) == 1 and is_list_target(tp)):
                problems.append(f"{role}: regression target column {t!r} in {source} is "
                                f"{tp}, not numeric")
    else:
        bad = ", ".join(f"{t!r} ({tp})" for t, tp in zip(present_targets, types, strict=True))
        problems.append(f"{role}: cannot infer the task from target column(s) {bad} in "
                        f"{source}; use one integer/string column for classification or "
                        "numeric columns for regression")
    return resolved or "classification", problems


@dataclass
class _FeatureChoice:
    """Feature columns chosen from a schema, the columns left out, and what is wrong."""

    names: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    suspects: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _named_features(schema: pa.Schema, features: Sequence[str], targets: Sequence[str],
                    source: str, role: str) -> _FeatureChoice:
    """The ``--features`` columns with their widths, or a problem for each unusable one."""
    names = schema.names
    out = _FeatureChoice()
    for c in features:
        if c not in names:
            out.problems.append(f"{role}: feature column {c!r} not found in {source} "
                                f"(columns: {_preview(names)})")
            continue
        if c in targets:
            out.problems.append(f"{role}: column {c!r} of {source} is both the target and a "
                                "feature")
            continue
        tp = schema.field(c).type
        w = VARIABLE if is_var_sequence(tp) else fixed_width(tp)
        if w is None:
            out.problems.append(_type_problem(role, source, c, tp))
        else:
            out.names.append(c)
            out.widths.append(w)
    return out


def _inferred_features(schema: pa.Schema, skip: set[str], source: str,
                       role: str) -> _FeatureChoice:
    """Every numeric column outside ``skip``; string columns kept aside as suspects."""
    out = _FeatureChoice()
    for c in schema.names:
        if c in skip:
            continue
        tp = schema.field(c).type
        w = VARIABLE if is_var_sequence(tp) else fixed_width(tp)
        if w is not None:
            out.names.append(c)
            out.widths.append(w)
        elif _is_varlist(tp) or pa.types.is_fixed_size_list(tp):
            out.problems.append(_type_problem(role, source, c, tp))
        elif _is_string(tp):
            out.suspects.append(c)
        else:
            out.ignored.append(c)
    return out


def _type_problem(role: str, source: str, column: str, tp: pa.DataType) -> str:
    if _is_varlist(tp):
        return (f"{role}: feature column {column!r} in {source} is a variable-length list "
                f"({tp}); features need a fixed width: store it as a fixed-size list, e.g. "
                "pa.list_(pa.float32(), 784), or a sequence as list<list<float>> / "
                "fixed_size_list<fixed_size_list<float, F>, T>")
    if pa.types.is_fixed_size_list(tp):
        return (f"{role}: feature column {column!r} in {source} is {tp}, "
                "not a fixed-size list of numbers")
    return (f"{role}: feature column {column!r} in {source} is not numeric ({tp}); "
            "choose numeric columns with --features")


def _preview(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def first_non_number(table: pa.Table, column: str) -> tuple[int, int, str | None]:
    """(count of numbers, first row that is not a number or -1, its value) of a string column."""
    arr = table.column(column)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    is_num = pc.match_substring_regex(arr, _NUMBER_RE, ignore_case=True)
    numbers = int(pc.sum(is_num).as_py() or 0)
    not_num = pc.and_(pc.invert(is_num), pc.is_valid(arr))
    idx = pc.index(not_num, True).as_py()
    value = None if idx < 0 else table.column(column)[idx].as_py()
    return numbers, idx, value


def audit_suspects(table: pa.Table, plan: ColumnPlan, spans: list, role: str = "data") -> None:
    """Refuse a default-inferred string column whose values are mostly numbers."""
    problems = []
    for c in plan.suspects:
        numbers, row, value = first_non_number(table, c)
        valid = table.num_rows - table.column(c).null_count
        if row >= 0 and numbers * 2 > valid:
            path, r = locate(spans, row)
            problems.append(f"{role}: column {c!r} of {path} is not numeric: row {r} holds "
                            f"{value!r} ({numbers} of {valid} values are numbers); fix the "
                            "value or leave the column out with --features")
    if problems:
        raise DataError(problems)


# ----------------------------------------------------------------- features
def _leaf_numpy(arr: pa.Array) -> np.ndarray:
    """A flat array as NumPy, nulls as NaN (zero-copy for null-free floats)."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_decimal(t) or pa.types.is_float16(t) or (arr.null_count and not
                                                             pa.types.is_floating(t)):
        arr = pc.cast(arr, pa.float64())
    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.uint8())
    return arr.to_numpy(zero_copy_only=False)


def flat_list_values(arr: pa.Array) -> np.ndarray:
    """Leaf values of a (nested) fixed-size-list array, flat; null lists at any level → NaN."""
    level_nulls = []
    while pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            level_nulls.append(np.asarray(arr.is_null()))
        w = arr.type.list_size
        arr = arr.values.slice(arr.offset * w, len(arr) * w)
    vals = _leaf_numpy(arr)
    if level_nulls and len(vals):
        vals = np.array(vals, dtype=np.float64)
        for mask in level_nulls:
            vals[np.repeat(mask, len(vals) // len(mask))] = np.nan
    return vals


def feature_matrix(table: pa.Table, plan: ColumnPlan, dtype: np.dtype | str,
                   out: np.ndarray | None = None) -> np.ndarray:
    """The ``(rows, n_features)`` feature array of ``dtype``; null/NaN/inf cells become NaN/inf.

    Scalar columns fill one column each; a fixed-size-list column of width w fills
    w consecutive columns (row-major for nested lists).
    """
    n = table.num_rows
    x = np.empty((n, plan.n_features), dtype=dtype) if out is None else out
    j = 0
    for name, w in zip(plan.feature_names, plan.feature_widths, strict=True):
        col = table.column(name)
        r = 0
        for chunk in col.chunks:
            m = len(chunk)
            if m == 0:
                continue
            if w == 1 and not pa.types.is_fixed_size_list(chunk.type):
                x[r:r + m, j] = _leaf_numpy(chunk)
            else:
                x[r:r + m, j:j + w] = flat_list_values(chunk).reshape(m, w)
            r += m
        j += w
    return x


def nonfinite_rows(a: np.ndarray) -> np.ndarray:
    """``(rows,)`` bool: rows of ``a`` (any shape with rows first) holding NaN or ±inf."""
    n = a.shape[0]
    bad = np.zeros(n, dtype=bool)
    if not np.issubdtype(a.dtype, np.floating) or n == 0:
        return bad  # (an empty piece: reshape(0, -1) has no width to infer)
    flat = a.reshape(n, -1)
    for r0 in range(0, n, _BLOCK_ROWS):
        blk = flat[r0:r0 + _BLOCK_ROWS]
        # one sum per row finds NaN/inf without a (rows, d) temporary of bools
        bad[r0:r0 + len(blk)] = ~np.isfinite(blk.sum(axis=1, dtype=np.float64))
    return bad


def first_bad_feature(x: np.ndarray, row: int, plan: ColumnPlan) -> str:
    cols = np.flatnonzero(~np.isfinite(x[row]))
    return plan.feature_label(int(cols[0])) if len(cols) else "?"


# ------------------------------------------------------------------ targets
def label_array(table: pa.Table, name: str) -> pa.Array:
    """The target column as one array with normalized label types (int64, string or bool)."""
    arr = table.column(name).combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_integer(t):
        return pc.cast(arr, pa.int64())
    if _is_string(t):
        return pc.cast(arr, pa.string())
    return arr


def label_problems(arr: pa.Array, name: str, spans: list, role: str) -> tuple[np.ndarray, list]:
    """``(bad_rows, problems)``: missing labels are bad rows; non-integral float labels errors."""
    bad = np.asarray(arr.is_null()) if arr.null_count else np.zeros(len(arr), dtype=bool)
    problems: list[str] = []
    if pa.types.is_floating(arr.type):
        v = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = bad | ~np.isfinite(v)
        frac = np.isfinite(v) & (v != np.round(v))
        if frac.any():
            path, r = locate(spans, int(np.argmax(frac)))
            problems.append(f"{role}: classification target {name!r} holds non-integral value "
                            f"{float(v[frac][0])!r} at row {r} of {path}; use --task regression")
    return bad, problems


def label_values(arr: pa.Array) -> np.ndarray:
    """Labels as NumPy: int64 for integral floats and ints, object (str) or bool otherwise.

    Missing labels get a placeholder; `label_problems` has marked those rows bad.
    """
    if arr.null_count:
        fill = "" if _is_string(arr.type) else (False if pa.types.is_boolean(arr.type) else 0)
        arr = pc.fill_null(arr, pa.scalar(fill, arr.type))
    if pa.types.is_floating(arr.type):
        v = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        return np.round(np.where(np.isfinite(v), v, 0.0)).astype(np.int64)
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def classes_of(labels: np.ndarray) -> list:
    """Sorted distinct labels as JSON-serialisable Python values."""
    return np.unique(labels).tolist()


def encode_labels(labels: np.ndarray, classes: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(index (n,) int64, unknown (n,) bool)``: position of each label in ``classes``.

    Labels are compared as the classes' type (ints with ints, strings with
    strings); a label that cannot be converted, or is missing, counts as unknown.
    """
    n = len(labels)
    cls = list(classes)
    if cls and not isinstance(cls[0], str) and labels.dtype != object:
        keys = np.asarray(cls)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        pos = np.clip(np.searchsorted(sorted_keys, labels), 0, len(cls) - 1)
        known = np.asarray(sorted_keys[pos] == labels, dtype=bool)
        return np.where(known, order[pos], 0).astype(np.int64), ~known
    as_str = bool(cls) and isinstance(cls[0], str)
    lookup = {c: i for i, c in enumerate(cls)}

    def key(v: object) -> object:
        if v is None:
            return None
        if as_str:
            return str(v)
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return int(f) if f.is_integer() else f

    idx = np.fromiter((lookup.get(key(v), -1) for v in labels), dtype=np.int64, count=n)
    unknown = idx < 0
    idx[unknown] = 0
    return idx, unknown


def regression_targets(table: pa.Table, names: Sequence[str], dtype: np.dtype | str
                       ) -> np.ndarray:
    """``(rows, k)`` float targets; nulls become NaN. One list column (a target per step,
    ``--sequence-target every``) gives ``(rows, T)``; rows must all hold T values."""
    if len(names) == 1 and is_list_target(table.schema.field(names[0]).type):
        return _list_targets(table, names[0], dtype)
    y = np.empty((table.num_rows, len(names)), dtype=dtype)
    for j, name in enumerate(names):
        r = 0
        for chunk in table.column(name).chunks:
            y[r:r + len(chunk), j] = _leaf_numpy(chunk)
            r += len(chunk)
    return y


def _list_targets(table: pa.Table, name: str, dtype: np.dtype | str) -> np.ndarray:
    arr = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return flat_list_values(arr).astype(dtype, copy=False).reshape(len(arr), -1)
    lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
    T = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and (lengths != T).any():
        r = int(np.argmax(lengths != T))
        raise DataError(f"data: target column {name!r}: row {r} holds {int(lengths[r])} "
                        f"values, row 0 holds {T}; a per-step target needs the same length "
                        "in every row")
    return _leaf_numpy(arr.flatten()).astype(dtype, copy=False).reshape(len(arr), T)


def bad_rows_message(role: str, what: str, count: int, path: str, row: int,
                     column: str | None = None) -> str:
    col = f", column {column!r}" if column else ""
    return (f"{role}: {count} row(s) with NaN, inf or a missing value in {what} "
            f"(first: row {row} of {path}{col}); fix the data or pass --on-bad-rows drop")
