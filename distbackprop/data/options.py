"""`DataOptions`: the values the data plane reads, and nothing else of a run's configuration.

The data plane takes these values rather than a whole training configuration so
that it depends on no layer above it; `DataOptions.of` reads the same attribute
names from any object (a ``TrainConfig``, a ``SimpleNamespace``, a
`DataOptions`), so a caller passes what it has.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distbackprop.data.errors import DataError


@dataclass(frozen=True)
class DataOptions:
    """What `load_training_data` needs.

    ``data``: file, directory or URI (None: the embedded digits); ``val_data``:
    a separate validation source, or ``val_fraction`` of the rows held out (None:
    0.1 without ``val_data``); ``target``: column(s); ``features``: columns
    (None: every other numeric column); ``task``: ``classification`` /
    ``regression`` / None (inferred); ``standardize``: x' = (x − μ) / σ over the
    training rows; ``streaming``: read piece by piece instead of into memory;
    ``on_bad_rows``: ``error`` or ``drop``; ``seed``: the validation split's;
    ``dtype``: ``float32`` or ``float64`` feature arrays.
    """

    data: str | None = None
    val_data: str | None = None
    val_fraction: float | None = None
    target: str | tuple[str, ...] = "target"
    features: str | tuple[str, ...] | None = None
    task: str | None = None
    standardize: bool = True
    streaming: bool = False
    on_bad_rows: str = "error"
    seed: int = 0
    dtype: str = "float32"

    @classmethod
    def of(cls, obj: Any) -> DataOptions:
        """The options named like this class's fields, read from ``obj``'s attributes.

        An attribute ``obj`` lacks keeps the field's default (the same default
        a ``TrainConfig`` has). Path-like values become strings, sequences of
        names tuples. A value of the wrong kind is a `DataError` naming the field.
        """
        if isinstance(obj, cls):
            return obj
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if hasattr(obj, f.name):
                values[f.name] = getattr(obj, f.name)
        return cls(**values)

    def __post_init__(self) -> None:
        # Normalise here so every constructor (direct or `of`) yields the same shapes:
        # paths as str, name lists as tuples; refuse what the loaders could not use.
        for name in ("data", "val_data"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                try:
                    object.__setattr__(self, name, os.fspath(v))
                except TypeError:
                    raise DataError(f"{name}: expected a path, got {type(v).__name__}") from None
        for name in ("target", "features"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                if not isinstance(v, Sequence):
                    raise DataError(f"{name}: expected column name(s), got {type(v).__name__}")
                object.__setattr__(self, name, tuple(str(c) for c in v))
        if self.on_bad_rows not in ("error", "drop"):
            raise DataError(f"on_bad_rows: {self.on_bad_rows!r} is not one of error, drop")
        try:
            dtype = np.dtype(self.dtype).name
        except TypeError:
            dtype = None
        if dtype not in ("float32", "float64"):
            raise DataError(f"dtype: {self.dtype!r} is not one of float32, float64")
        object.__setattr__(self, "dtype", dtype)

    def replace(self, **changes: Any) -> DataOptions:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


__all__ = ["DataOptions"]
