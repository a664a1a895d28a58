"""The data plane: sources, schema checks, the memory-mapped cache, sharded batches.

Public API (see each function's docstring):

* `load_training_data(options) -> DataBundle` (``options``: a `DataOptions`, or any
  object with its attribute names such as a ``TrainConfig``); `DataBundle.model_meta()`;
  ``bundle.warnings`` (what changes training: show them even when quiet), ``bundle.notes``
* `prepare_inference(model_meta, path, target) -> (x, y | None, feature_names)`
* `write_cache(bundle, directory) -> Path`; `open_cache(path) -> (x, y)`
* `Batcher(x, y, batch_size, seed, rank, world)`: in-memory global batches, per-rank slices
* `StreamingBatcher(plan, batch_size=, seed=, rank=, world=)`: data larger than memory
* `inspect(path, target) -> dict`; `format_inspect(d) -> str`
* `write_predictions(model, data, out) -> rows` (``distbackprop predict``)
* `embedded_digits_path()`; `DataError` (an `InputError`: CLI exit status 2)
"""

from distbackprop.data.batcher import Batcher, rank_bounds
from distbackprop.data.bundle import (
    DEFAULT_VAL_FRACTION,
    META_KEYS,
    DataBundle,
    load_training_data,
    prepare_inference,
)
from distbackprop.data.cache import open_cache, write_cache
from distbackprop.data.errors import DataError
from distbackprop.data.inspection import format_inspect, inspect
from distbackprop.data.options import DataOptions
from distbackprop.data.predictions import prediction_table, write_predictions
from distbackprop.data.sources import embedded_digits_path, open_source
from distbackprop.data.streaming import Piece, StreamingBatcher, StreamPlan

__all__ = [
    "Batcher", "DataBundle", "DataError", "DataOptions", "DEFAULT_VAL_FRACTION", "META_KEYS",
    "Piece", "StreamPlan", "StreamingBatcher", "embedded_digits_path", "format_inspect", "inspect",
    "load_training_data", "open_cache", "open_source", "prepare_inference", "rank_bounds",
    "prediction_table", "write_cache", "write_predictions",
]
