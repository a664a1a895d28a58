"""Run history on disk: ``history.parquet`` (one row per step) and ``memory.parquet``.

history.parquet columns (extend, never rename: readers select columns by name):
``step, epoch, loss, samples, lr, grad_global_norm, grad_max_abs, nonfinite, skipped,
step_seconds, sharpness, workers, time/<phase> for phase in PHASES, grad_norm/<layer>,
update_ratio/<layer>``, and for ``--model rnn`` ``time_grad_norm/<bucket>`` (RMS of
‖∂L/∂h_t‖ over the steps t of each time bucket, e.g. ``time_grad_norm/t1-25``).

memory.parquet columns: ``step, worker, rss_bytes, peak_rss_bytes, activation_bytes,
open_fds, threads`` (one row per worker per chunk end; all int64; the last two are
what a soak watches for leaks).

Chunks are kept as a list of arrays and concatenated once when written, so
appending costs O(chunk) and nothing is re-copied per step. Files are written
through `distbackprop.atomic.atomic_path` (temporary name, fsync, rename), so a
reader never sees half a file. pyarrow.parquet is used here by the project's rule
for history writers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..errors import ConfigError
from .health import PHASES

_SCALARS: tuple[tuple[str, type], ...] = (
    ("step", np.int64), ("epoch", np.int64), ("loss", np.float64), ("samples", np.int64),
    ("lr", np.float64), ("grad_global_norm", np.float64), ("grad_max_abs", np.float64),
    ("nonfinite", np.int64), ("skipped", np.bool_), ("step_seconds", np.float64),
    ("sharpness", np.float64), ("workers", np.int64),
)
# sharpness: measured only every --sharpness-every steps (NaN otherwise); workers: the
# group size that ran the step. Both absent in older files.
_OPTIONAL: dict[str, float] = {"sharpness": np.nan, "workers": 0}  # name → fill value
# shared_bytes: the machine-shared θ and gradients a worker maps (the sharded update on
# one machine; counted in the RSS of every worker that touched them). Absent in older files.
MEMORY_COLUMNS: tuple[str, ...] = (
    "step", "worker", "rss_bytes", "peak_rss_bytes", "activation_bytes", "open_fds", "threads",
    "shared_bytes",
)


def history_columns(layers: Sequence[str], time_buckets: Sequence[str] = ()) -> list[str]:
    """Column names of history.parquet for these layers (and time buckets), in file order."""
    return ([name for name, _ in _SCALARS] + [f"time/{p}" for p in PHASES]
            + [f"grad_norm/{x}" for x in layers] + [f"update_ratio/{x}" for x in layers]
            + [f"time_grad_norm/{b}" for b in time_buckets])


def _write_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


class HistoryWriter:
    """Collects per-step chunk statistics; `to_table`/`write` give history.parquet."""

    def __init__(self, layers: Sequence[str], time_buckets: Sequence[str] = ()):
        self.layers = [str(x) for x in layers]
        self.time_buckets = [str(b) for b in time_buckets]
        self._chunks: list[dict[str, np.ndarray]] = []
        self._steps = 0

    def __len__(self) -> int:
        return self._steps

    def append(self, stats: Mapping[str, np.ndarray]) -> None:
        """Add one chunk (K steps, the brief's arrays). Copies, so the caller may
        reuse its buffers. Raises ValueError naming a missing or misshapen key."""
        k = int(np.asarray(stats["step"]).shape[0]) if "step" in stats else None
        if k is None:
            raise ValueError("stats: missing key 'step'")
        L = len(self.layers)
        chunk: dict[str, np.ndarray] = {}
        want = [(name, dt, (k,)) for name, dt in _SCALARS] + [
            ("grad_norm", np.float64, (k, L)), ("update_ratio", np.float64, (k, L)),
            ("phase_seconds", np.float64, (k, len(PHASES))),
        ] + ([("time_grad_norm", np.float64, (k, len(self.time_buckets)))]
             if self.time_buckets else [])
        for name, dt, shape in want:
            if name in _OPTIONAL and name not in stats:
                chunk[name] = np.full(shape, _OPTIONAL[name], dtype=dt)
                continue
            if name not in stats:
                raise ValueError(f"stats: missing key {name!r}")
            a = np.array(stats[name], dtype=dt, copy=True)
            if a.shape != shape:
                raise ValueError(f"stats[{name!r}]: expected shape {shape}, got {a.shape}")
            chunk[name] = a
        self._chunks.append(chunk)
        self._steps += k

    def truncate(self, step: int) -> None:
        """Forget the rows of steps ≥ `step` (a recovery rewinds and replays them)."""
        kept = []
        for c in self._chunks:
            keep = c["step"] < step
            if keep.all():
                kept.append(c)
            elif keep.any():
                kept.append({k: v[keep] for k, v in c.items()})
        self._chunks = kept
        self._steps = sum(len(c["step"]) for c in kept)

    def _column(self, name: str, dt: type, width: int | None = None) -> np.ndarray:
        if not self._chunks:
            return np.zeros((0,) if width is None else (0, width), dtype=dt)
        return np.concatenate([c[name] for c in self._chunks])

    def to_table(self) -> pa.Table:
        """All steps so far as a pyarrow Table with `history_columns(layers)`."""
        cols: dict[str, np.ndarray] = {}
        for name, dt in _SCALARS:
            cols[name] = self._column(name, dt)
        phase = self._column("phase_seconds", np.float64, len(PHASES))
        for j, p in enumerate(PHASES):
            cols[f"time/{p}"] = np.ascontiguousarray(phase[:, j])
        L = len(self.layers)
        for key in ("grad_norm", "update_ratio"):
            m = self._column(key, np.float64, L)
            for i, layer in enumerate(self.layers):
                cols[f"{key}/{layer}"] = np.ascontiguousarray(m[:, i])
        if self.time_buckets:
            m = self._column("time_grad_norm", np.float64, len(self.time_buckets))
            for i, b in enumerate(self.time_buckets):
                cols[f"time_grad_norm/{b}"] = np.ascontiguousarray(m[:, i])
        return pa.table(cols)

    def write(self, path: str | os.PathLike) -> Path:
        """Write history.parquet atomically (temp file + rename); returns the path."""
        return _write_atomic(self.to_table(), path)

    def extend_from_parquet(self, path: str | os.PathLike, upto_step: int | None = None) -> None:
        """Append the rows of an existing history.parquet (for ``--resume``): those with
        ``step < upto_step`` when given (steps are 0-based, so a checkpoint at step N
        keeps steps 0..N-1). Raises `ConfigError` naming the file and column."""
        try:
            cols = read_columns(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise ConfigError(f"{path}: cannot read as Parquet: {exc}") from exc
        n_rows = len(cols.get("step", ()))
        for name, fill in _OPTIONAL.items():
            cols.setdefault(name, np.full(n_rows, fill))
        need = [name for name, _ in _SCALARS] + [f"time/{p}" for p in PHASES] + [
            f"{k}/{x}" for k in ("grad_norm", "update_ratio") for x in self.layers] + [
            f"time_grad_norm/{b}" for b in self.time_buckets]
        missing = [name for name in need if name not in cols]
        if missing:
            raise ConfigError([f"{path}: missing column {name!r}" for name in missing])
        keep = np.ones(len(cols["step"]), dtype=bool) if upto_step is None \
            else cols["step"] < upto_step
        n = int(keep.sum())
        chunk = {name: cols[name][keep] for name, _ in _SCALARS}
        chunk["phase_seconds"] = np.stack([cols[f"time/{p}"][keep] for p in PHASES], axis=1)
        for k in ("grad_norm", "update_ratio"):
            chunk[k] = (np.stack([cols[f"{k}/{x}"][keep] for x in self.layers], axis=1)
                        if self.layers else np.zeros((n, 0)))
        if self.time_buckets:
            chunk["time_grad_norm"] = np.stack(
                [cols[f"time_grad_norm/{b}"][keep] for b in self.time_buckets], axis=1)
        self.append(chunk)

    @classmethod
    def from_file(cls, path: str | os.PathLike, layers: Sequence[str],
                  before_step: int | None = None, time_buckets: Sequence[str] = ()
                  ) -> HistoryWriter:
        """A new writer holding the rows of `path` (see `extend_from_parquet`)."""
        w = cls(layers, time_buckets)
        w.extend_from_parquet(path, upto_step=before_step)
        return w


class MemoryHistory:
    """Per-worker memory at each chunk end; `write` gives memory.parquet."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, step: int, memory: Mapping[int, Mapping[str, int]]) -> None:
        """`memory`: {rank: {"rss_bytes", "activation_bytes", optional "peak_rss_bytes"}}."""
        for rank, m in sorted(memory.items()):
            rss = int(m["rss_bytes"])
            self._rows.append((int(step), int(rank), rss, int(m.get("peak_rss_bytes", rss)),
                               int(m.get("activation_bytes", 0)), int(m.get("open_fds", 0)),
                               int(m.get("threads", 0)), int(m.get("shared_bytes", 0))))

    def truncate(self, step: int) -> None:
        """Forget the rows recorded at steps ≥ `step`."""
        self._rows = [r for r in self._rows if r[0] < step]

    def to_table(self) -> pa.Table:
        arr = np.array(self._rows, dtype=np.int64).reshape(-1, len(MEMORY_COLUMNS))
        return pa.table({name: arr[:, i].copy() for i, name in enumerate(MEMORY_COLUMNS)})

    def write(self, path: str | os.PathLike) -> Path:
        """Write memory.parquet atomically; returns the path."""
        return _write_atomic(self.to_table(), path)

    @classmethod
    def from_file(cls, path: str | os.PathLike, before_step: int | None = None
                  ) -> MemoryHistory:
        """The rows of an existing memory.parquet (``step < before_step`` when given)."""
        try:
            cols = read_columns(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise ConfigError(f"{path}: cannot read as Parquet: {exc}") from exc
        for name in MEMORY_COLUMNS[:5]:
            if name not in cols:
                raise ConfigError(f"{path}: missing column {name!r}")
        n = len(cols["step"])
        for name in MEMORY_COLUMNS[5:]:  # absent in files from before they existed
            cols.setdefault(name, np.zeros(n, np.int64))
        m = cls()
        for row in zip(*(cols[name].tolist() for name in MEMORY_COLUMNS), strict=True):
            if before_step is None or row[0] < before_step:
                m._rows.append(tuple(int(v) for v in row))
        return m


def read_columns(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A Parquet file as {column: numpy array} (for `distbackprop report`)."""
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy() for name in table.column_names}


__all__ = ["HistoryWriter", "MEMORY_COLUMNS", "MemoryHistory", "history_columns",
           "read_columns"]
