"""The in-memory mode's node-local cache: one uncompressed Arrow IPC file, memory-mapped.

Layout: a single record batch with two columns, ``x`` = fixed_size_list<dtype>[d]
and ``y`` = int64 (class indices) or fixed_size_list<dtype>[k] (regression). A
fixed-size list's values are one contiguous buffer and a single batch keeps it
in one piece, so `open_cache` returns ``x`` as a zero-copy ``(n, d)`` view of
the mapped file: every worker process on a node shares the same page-cache
pages instead of holding its own copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from distbackprop.atomic import atomic_path
from distbackprop.data.errors import DataError
from distbackprop.data.tables import DataBundle

CACHE_NAME = "train.arrow"


def _column(a: np.ndarray) -> pa.Array:
    """(n,) → plain array; (n, w) → fixed_size_list[w] over the same (zero-copy) buffer."""
    a = np.ascontiguousarray(a)
    if a.ndim == 1:
        return pa.array(a)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def write_cache(bundle: DataBundle, directory: str | os.PathLike, name: str = CACHE_NAME) -> Path:
    """Write the training split of ``bundle`` to ``directory/name``; return the path.

    Written through `atomic_path`, so a reader never sees half a cache and a
    failed write leaves nothing behind. An unwritable directory is a `DataError`.
    """
    if bundle.x_train is None or bundle.y_train is None:
        raise DataError("cache: the bundle has no in-memory training rows (streaming mode)")
    directory = Path(directory)
    x, y = bundle.x_train, bundle.y_train
    meta = {"task": bundle.task, "rows": int(len(x)), "n_features": int(x.shape[1]),
            "n_outputs": int(bundle.n_outputs), "dtype": str(x.dtype), "source": bundle.source}
    schema = pa.schema([("x", _column(x[:0]).type), ("y", _column(y[:0]).type)],
                       metadata={"distbackprop": json.dumps(meta)})
    batch = pa.record_batch([_column(x), _column(y)], schema=schema)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / name) as tmp, \
                pa.OSFile(os.fspath(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cache: cannot write {directory / name}: {exc}") from exc
    return directory / name


def _numpy(col: pa.Array) -> np.ndarray:
    if pa.types.is_fixed_size_list(col.type):
        w = col.type.list_size
        flat = col.values.slice(col.offset * w, len(col) * w)
        return flat.to_numpy(zero_copy_only=True).reshape(len(col), w)
    return col.to_numpy(zero_copy_only=True)


def open_cache(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(x (n, d), y)`` as read-only zero-copy views of the memory-mapped cache file.

    The arrays keep the mapping alive; the pages are the OS page cache's, shared
    by every process that maps the file.
    """
    try:
        source = pa.memory_map(os.fspath(path), "r")
        reader = pa.ipc.open_file(source)
        if reader.num_record_batches != 1:
            raise DataError(f"cache: {path} holds {reader.num_record_batches} record batches, "
                            "expected 1 (not written by write_cache)")
        batch = reader.get_batch(0)
        return _numpy(batch.column(0)), _numpy(batch.column(1))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cache: cannot open {path}: {exc}") from exc
