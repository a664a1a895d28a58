"""Training and inference data as NumPy arrays: `load_training_data`, `prepare_inference`.

The training path: open the source → resolve columns (`schema.plan_columns`) →
read every file (errors name the file) → features ``(n, d)`` of the configured
dtype, targets (class indices or ``(n, k)`` floats) → bad rows refused or
dropped → validation split → standardization statistics over the training rows
only, applied to training and validation features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distbackprop.data.errors import DataError
from distbackprop.data.options import DataOptions
from distbackprop.data.schema import (
    VARIABLE,
    ColumnPlan,
    classes_of,
    normalize_names,
    plan_columns,
)
from distbackprop.data.sources import Source, embedded_digits_path, open_source
from distbackprop.data.standardize import RunningStats, standardize_
from distbackprop.data.streaming import load_streaming
from distbackprop.data.tables import (
    META_KEYS,
    DataBundle,
    dropped_warning,
    encode_or_raise,
    read_arrays,
    read_validation,
    untrained_class_warnings,
)

DEFAULT_VAL_FRACTION = 0.1


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


def resolve_val_fraction(options: Any) -> float:
    """The fraction of rows held out: 0 with ``val_data``, else ``val_fraction`` or 0.1."""
    opts = DataOptions.of(options)
    if opts.val_data is not None:
        if opts.val_fraction:
            raise DataError("val_fraction: cannot be combined with val_data "
                            f"(got {opts.val_fraction}); use one of them")
        return 0.0
    return DEFAULT_VAL_FRACTION if opts.val_fraction is None else float(opts.val_fraction)


def training_plan(options: Any) -> tuple[Source, ColumnPlan, str]:
    """Open ``options.data`` (or the embedded digits) and resolve its columns."""
    opts = DataOptions.of(options)
    path = opts.data if opts.data is not None else str(embedded_digits_path())
    src = open_source(path, "data")
    features = normalize_names(opts.features) or None
    plan = plan_columns(src.schema, source=path, target=opts.target, features=features,
                        task=opts.task, partition_columns=src.partition_columns)
    if opts.streaming and (VARIABLE in plan.feature_widths or plan.target_width is None):
        raise DataError(f"streaming: a list<list> sequence column or list<float> target in "
                        f"{path} needs its length known before reading; store it as "
                        "fixed_size_list<fixed_size_list<float, F>, T> (fixed_size_list<float, "
                        "T>) or train without --streaming")
    return src, plan, path


def load_training_data(options: DataOptions | Any) -> DataBundle:
    """Read, check, split and standardize the training data.

    ``options`` is a `DataOptions` or any object with its attribute names (a
    ``TrainConfig``; converted with `DataOptions.of`). Uses ``data`` (the
    embedded digits when None), ``val_data`` / ``val_fraction`` (0.1 without
    val_data), ``target``, ``features``, ``task``, ``standardize``,
    ``on_bad_rows``, ``dtype``, ``seed``; with ``streaming`` only statistics are
    gathered here (one pass) and ``bundle.stream`` is set. Whatever changes what
    is trained (a column left out, rows dropped, a class with no training rows)
    is listed in ``bundle.warnings``. Raises `DataError` before anything is returned.
    """
    opts = DataOptions.of(options)
    dtype = np.dtype(opts.dtype)
    fraction = resolve_val_fraction(opts)
    src, plan, path = training_plan(opts)
    if opts.streaming:
        return load_streaming(opts, src, plan, path, fraction)

    arrs = read_arrays(src, plan, dtype=dtype, on_bad_rows=opts.on_bad_rows)
    plan = arrs.plan or plan  # list<list> sequence widths are known once the rows are read
    warnings = list(plan.warnings)
    if arrs.dropped:
        warnings.append(dropped_warning(arrs.dropped, path))
    classes = None
    if plan.task == "classification":
        classes = classes_of(arrs.labels)
        y_all = encode_or_raise(arrs, classes, plan.target_names[0], "data")
    else:
        y_all = arrs.y

    dropped = arrs.dropped
    if opts.val_data is not None:
        x_train, y_train = arrs.x, y_all
        x_val, y_val, val_dropped = read_validation(opts.val_data, plan, classes, dtype,
                                                    opts.on_bad_rows)
        if val_dropped:
            warnings.append(dropped_warning(val_dropped, opts.val_data))
    else:
        train_idx, val_idx = split_indices(len(arrs.x), fraction, opts.seed)
        if len(val_idx):
            x_train, y_train = arrs.x[train_idx], y_all[train_idx]
            x_val, y_val = arrs.x[val_idx], y_all[val_idx]
        else:
            x_train, y_train, x_val, y_val = arrs.x, y_all, None, None
    del arrs
    if classes is not None:
        warnings.extend(untrained_class_warnings(y_train, classes, plan.target_names[0], path))

    mean, std = _stats(x_train, opts.standardize)
    if opts.standardize:
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
        dropped_rows=dropped, notes=list(plan.notes), warnings=warnings,
        sequence=plan.sequence)


def _stats(x: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    d = x.shape[1]
    if not standardize:
        return np.zeros(d), np.ones(d)
    stats = RunningStats(d)
    stats.update_(x)
    return stats.finalize()


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
    # list<list> sequence rows: the width is checked once they are read (below)
    if VARIABLE not in plan.feature_widths and (plan.n_features != meta["n_features"]
                                                or plan.feature_widths != widths):
        raise DataError(f"data: {path} gives {plan.n_features} features "
                        f"(columns {', '.join(names[:5])}{' …' if len(names) > 5 else ''}) but "
                        f"the model expects {meta['n_features']}")
    if (targets and meta["task"] == "regression"
            and len(plan.target_names) != meta["n_outputs"]):
        raise DataError(f"data: {len(plan.target_names)} target column(s) given but the model "
                        f"predicts {meta['n_outputs']}")
    arrs = read_arrays(src, plan, dtype=dtype, on_bad_rows=on_bad_rows)
    if arrs.x.shape[1] != meta["n_features"]:
        raise DataError(f"data: {path} gives {arrs.x.shape[1]} features per row but the model "
                        f"expects {meta['n_features']}")
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


__all__ = ["DEFAULT_VAL_FRACTION", "META_KEYS", "DataBundle", "load_training_data",
           "prepare_inference", "resolve_val_fraction", "split_indices", "training_plan"]
