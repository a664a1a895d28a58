"""Streaming mode: data larger than memory, read piece by piece, each rank only its own.

A *piece* is a Parquet row group (or a whole Arrow IPC / CSV file). The driver
makes one pass (`load_streaming`) that checks every row, counts each piece's
training rows, gathers the standardization statistics and the class list, and
holds out the validation rows; workers then build a `StreamingBatcher`.

Sharding and equal step counts: pieces are assigned to ranks once (greedy on
training rows, so ranks get nearly equal shares). Rank r contributes
``b_r = rank_bounds(B, r, world)`` rows to every global batch of B rows, and
every rank takes ``S = min_r floor(R_r / b_r)`` steps per epoch (R_r: rank r's
training rows) — computed from the plan alone, so all ranks agree without
talking and none waits at an allreduce. Each epoch a rank therefore leaves out
its last ``R_r − S·b_r`` rows in shuffled order (different rows each epoch,
since the piece order and the buffer are reshuffled per epoch); no row is
repeated, and every global batch has exactly B rows.

Shuffling: each epoch a rank reads its pieces in a seeded order through a
shuffle buffer of ``shuffle_buffer`` rows; each batch draws ``b_r`` random rows
from the buffer, which is then refilled from the stream.

Validation hold-out without a ``--val-data``: row ``i`` (its position in the
whole dataset) is a validation row when splitmix64(i ⊕ h(seed)) / 2⁶⁴ < fraction,
so every process decides it alone, from the row number.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from distbackprop.data.batcher import epoch_seed, rank_bounds
from distbackprop.data.errors import DataError
from distbackprop.data.options import DataOptions
from distbackprop.data.schema import ColumnPlan, audit_suspects, classes_of, encode_labels
from distbackprop.data.sources import (
    Source,
    check_fragment_columns,
    open_source,
    read_fragment,
)
from distbackprop.data.standardize import RunningStats, standardize_
from distbackprop.data.tables import (
    Arrays,
    BadRows,
    DataBundle,
    convert_table,
    dropped_warning,
    encode_or_raise,
    read_validation,
    untrained_class_warnings,
)

DEFAULT_SHUFFLE_BUFFER = 8192
_M64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Piece:
    """One unit of streaming reads.

    ``row_group`` is the Parquet row-group id (None: the whole file);
    ``file_row`` its first row within the file; ``start`` its first row in the
    whole dataset; ``rows`` its row count; ``usable`` the training rows it yields
    (rows minus held-out validation rows minus dropped bad rows).
    """

    path: str
    row_group: int | None
    file_row: int
    start: int
    rows: int
    usable: int


@dataclass(frozen=True, eq=False)
class StreamPlan:
    """Everything a worker needs to stream its share (picklable: plain values and arrays)."""

    source: str
    columns: ColumnPlan
    classes: tuple | None
    mean: np.ndarray
    std: np.ndarray
    standardize: bool
    dtype: str
    on_bad_rows: str
    seed: int
    val_fraction: float
    pieces: tuple[Piece, ...] = field(default=())

    @property
    def n_train(self) -> int:
        return int(sum(p.usable for p in self.pieces))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def holdout_mask(rows: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """``(n,)`` bool: rows (dataset row numbers) held out for validation."""
    if fraction <= 0:
        return np.zeros(len(rows), dtype=bool)
    key = _splitmix64(np.array([int(seed) & _M64], dtype=np.uint64))
    with np.errstate(over="ignore"):
        z = _splitmix64(rows.astype(np.uint64) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def _piece_spans(piece: Piece) -> list:
    # shifted so that `locate` reports rows within the file, not within the piece
    return [(piece.path, -piece.file_row, piece.file_row + piece.rows)]


def _read_piece(src: Source, frags: dict, path: str, row_group: int | None,
                columns: list[str], role: str) -> pa.Table:
    frag = frags[path]
    if row_group is not None:
        try:
            frag = frag.subset(row_group_ids=[row_group])
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{role}: cannot read {path}: {exc}") from exc
    return read_fragment(src, frag, columns, role)


def _list_pieces(src: Source, plan: ColumnPlan, role: str) -> Iterator[tuple]:
    """``(fragment, row_group | None, file_row, rows | None)`` in file order."""
    for frag in src.fragments:
        check_fragment_columns(src, frag, plan.columns, role)
        if src.format == "parquet":
            try:
                groups = frag.row_groups
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{role}: cannot read {frag.path}: {exc}") from exc
            offset = 0
            for rg in groups:
                yield frag, rg.id, offset, rg.num_rows
                offset += rg.num_rows
        else:
            yield frag, None, 0, None


@dataclass
class _Scan:
    """What the driver's pass over every training piece gathered."""

    stats: RunningStats
    pieces: list[Piece] = field(default_factory=list)
    uniques: list[np.ndarray] = field(default_factory=list)
    trained: list[np.ndarray] = field(default_factory=list)  # to find classes never trained
    val_x: list[np.ndarray] = field(default_factory=list)
    val_t: list[np.ndarray] = field(default_factory=list)
    reports: dict[str, BadRows] = field(default_factory=dict)
    rows: int = 0
    dropped: int = 0

    @property
    def n_train(self) -> int:
        return sum(p.usable for p in self.pieces)


def _scan_pieces(opts: DataOptions, src: Source, plan: ColumnPlan, dtype: np.dtype,
                 fraction: float, role: str) -> _Scan:
    """The `_Scan` of every piece: bad rows, statistics, labels and held-out rows."""
    frags = {f.path: f for f in src.fragments}
    scan = _Scan(RunningStats(plan.n_features))
    for frag, rg, file_row, _ in _list_pieces(src, plan, role):
        table = _read_piece(src, frags, frag.path, rg, plan.columns, role)
        start = scan.rows
        piece = Piece(frag.path, rg, file_row, start, table.num_rows, 0)
        spans = _piece_spans(piece)
        audit_suspects(table, plan, spans, role)
        conv = convert_table(table, spans, plan, dtype, role)
        del table
        for r in conv.reports:
            if r.what in scan.reports:
                scan.reports[r.what].count += r.count
            else:
                scan.reports[r.what] = r
        scan.dropped += int(conv.bad.sum())
        held = holdout_mask(np.arange(start, start + piece.rows), opts.seed, fraction)
        good = ~conv.bad
        train = good & ~held
        scan.stats.update_(conv.x[train])
        if conv.labels is not None:
            scan.uniques.append(np.unique(conv.labels[good]))
            scan.trained.append(np.unique(conv.labels[train]))
        if held.any():
            keep = good & held
            scan.val_x.append(conv.x[keep])
            scan.val_t.append(conv.labels[keep] if conv.labels is not None else conv.y[keep])
        scan.pieces.append(Piece(frag.path, rg, file_row, start, piece.rows, int(train.sum())))
        scan.rows += piece.rows
    return scan


def _check_scan(scan: _Scan, opts: DataOptions, path: str, role: str) -> None:
    """Raise `DataError` when the scan leaves nothing to train on or met refused bad rows."""
    if scan.rows == 0:
        raise DataError(f"{role}: {path} has no rows")
    if scan.reports and opts.on_bad_rows != "drop":
        raise DataError([r.message(role) for r in scan.reports.values()])
    if scan.n_train == 0:
        raise DataError(f"{role}: no training rows left in {path} after dropping bad rows and "
                        "holding out validation rows")


def _validation_set(opts: DataOptions, scan: _Scan, plan: ColumnPlan, classes: list | None,
                    dtype: np.dtype, mean: np.ndarray, std: np.ndarray
                    ) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """``(x_val, y_val, warnings)`` from ``--val-data`` or else the held-out rows."""
    x_val = y_val = None
    extra: list[str] = []
    if opts.val_data is not None:
        x_val, y_val, val_dropped = read_validation(opts.val_data, plan, classes, dtype,
                                                    opts.on_bad_rows)
        if val_dropped:
            extra.append(dropped_warning(val_dropped, opts.val_data))
    elif scan.val_x:
        x_val = np.concatenate(scan.val_x)
        raw = np.concatenate(scan.val_t)
        y_val = encode_labels(raw, classes)[0] if classes is not None else raw
    if x_val is not None and opts.standardize:
        standardize_(x_val, mean, std)
    return x_val, y_val, extra


def _scan_warnings(plan: ColumnPlan, scan: _Scan, classes: list | None, path: str,
                   val_warnings: list[str]) -> list[str]:
    """The bundle's warnings: the plan's, dropped rows, validation, classes never trained."""
    warnings = list(plan.warnings)
    if scan.dropped:
        warnings.append(dropped_warning(scan.dropped, path))
    warnings.extend(val_warnings)
    if classes is not None:
        seen = np.unique(np.concatenate(scan.trained))
        warnings.extend(untrained_class_warnings(encode_labels(seen, classes)[0], classes,
                                                 plan.target_names[0], path))
    return warnings


def load_streaming(options: DataOptions, src: Source, plan: ColumnPlan, path: str,
                   fraction: float) -> DataBundle:
    """The driver's one pass over the training data for streaming mode.

    Checks every row (the bad-row policy applies to the whole dataset before the
    first step), gathers mean/std over training rows only, the sorted class list
    and the validation rows; returns a bundle whose ``stream`` is the plan.
    ``options``: what `load_training_data` was given (a `DataOptions`).
    """
    opts = DataOptions.of(options)
    dtype = np.dtype(opts.dtype)
    role = "data"
    scan = _scan_pieces(opts, src, plan, dtype, fraction, role)
    _check_scan(scan, opts, path, role)

    classes = classes_of(np.concatenate(scan.uniques)) if scan.uniques else None
    mean, std = scan.stats.finalize() if opts.standardize else (
        np.zeros(plan.n_features), np.ones(plan.n_features))
    x_val, y_val, val_warnings = _validation_set(opts, scan, plan, classes, dtype, mean, std)
    warnings = _scan_warnings(plan, scan, classes, path, val_warnings)
    stream = StreamPlan(path, plan, None if classes is None else tuple(classes), mean, std,
                        bool(opts.standardize), dtype.name, opts.on_bad_rows,
                        int(opts.seed), fraction, tuple(scan.pieces))
    return DataBundle(
        x_train=None, y_train=None, x_val=x_val, y_val=y_val, task=plan.task,
        n_features=plan.n_features,
        n_outputs=len(classes) if classes is not None else len(plan.target_names),
        classes=classes, feature_names=list(plan.feature_names),
        target_names=list(plan.target_names), mean=mean, std=std, source=path,
        feature_widths=list(plan.feature_widths), dtype=dtype.name, n_train=scan.n_train,
        dropped_rows=scan.dropped, notes=list(plan.notes), warnings=warnings, stream=stream,
        sequence=plan.sequence)


def assign_pieces(pieces: tuple[Piece, ...], shares: list[int], seed: int) -> list[list[int]]:
    """Piece indices per rank: largest first, each to the rank with the fewest rows per
    batch share (ties: a seeded order, then the lower rank). Ranks with share 0 get none.
    """
    world = len(shares)
    tiebreak = np.random.default_rng(epoch_seed(seed, 0x5EED)).permutation(len(pieces))
    order = sorted((i for i in range(len(pieces)) if pieces[i].usable > 0),
                   key=lambda i: (-pieces[i].usable, tiebreak[i]))
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    live = [r for r in range(world) if shares[r] > 0]
    for i in order:
        r = min(live, key=lambda k: ((load[k] + pieces[i].usable) / shares[k], k))
        out[r].append(i)
        load[r] += pieces[i].usable
    for lst in out:
        lst.sort()
    return out


class StreamingBatcher:
    """Rank ``rank``'s part of every global batch, streamed from its own pieces.

    ``plan`` comes from ``load_training_data(config).stream`` (streaming mode).
    Same interface as `Batcher`: ``steps_per_epoch`` and
    ``batch(epoch, step) -> (x_local, y_local, global_count)``; batches are
    produced in order — a call out of sequence (a resume) replays the epoch from
    its start, so the result still depends only on ``(seed, epoch, step)``.
    ``pieces_read`` lists every ``(file, row_group)`` read, for tests. With
    ``prefetch`` one thread reads the next piece ahead (in the same fixed order).
    """

    def __init__(self, plan: StreamPlan, *, batch_size: int, seed: int | None = None,
                 rank: int = 0, world: int = 1,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, prefetch: bool = True):
        if batch_size <= 0:
            raise DataError(f"batch_size: must be > 0, got {batch_size}")
        if not 0 <= rank < world:
            raise DataError(f"streaming: rank {rank} outside world of {world}")
        self.plan = plan
        self.batch_size = int(batch_size)
        self.seed = plan.seed if seed is None else int(seed)
        self.rank, self.world = int(rank), int(world)
        self.shares = [b - a for a, b in (rank_bounds(self.batch_size, r, world)
                                          for r in range(world))]
        self.assignment = assign_pieces(plan.pieces, self.shares, self.seed)
        self.rank_rows = [sum(plan.pieces[i].usable for i in a) for a in self.assignment]
        live = [r for r in range(world) if self.shares[r] > 0]
        self.steps_per_epoch = min(self.rank_rows[r] // self.shares[r] for r in live)
        if self.steps_per_epoch == 0:
            usable = sum(1 for p in plan.pieces if p.usable)
            raise DataError(
                f"streaming: {usable} piece(s) (row groups or files) of {plan.source} with "
                f"{plan.n_train} training rows cannot give {len(live)} worker(s) a batch share of "
                f"{max(self.shares)} rows each; write more, smaller row groups, use fewer "
                "workers, or train in memory")
        self.share = self.shares[self.rank]
        self.assigned = tuple(plan.pieces[i] for i in self.assignment[self.rank])
        self.pieces_read: list[tuple[str, int | None]] = []
        self.capacity = max(int(shuffle_buffer), self.share, 1)
        d = plan.columns.n_features
        self._dtype = np.dtype(plan.dtype)
        self._buf_x = np.empty((self.capacity, d), dtype=self._dtype)
        y_shape = (() if plan.columns.task == "classification"
                   else (plan.columns.target_width or len(plan.columns.target_names),))
        y_dtype = np.int64 if plan.columns.task == "classification" else self._dtype
        self._buf_y = np.empty((self.capacity, *y_shape), dtype=y_dtype)
        self._out_x = np.empty((self.share, d), dtype=self._dtype)
        self._out_y = np.empty((self.share, *y_shape), dtype=y_dtype)
        self._src: Source | None = None
        self._frags: dict = {}
        self._it: Iterator | None = None
        self._pos: tuple[int, int] | None = None
        # one reader thread: the next piece decodes (pyarrow and NumPy release the
        # GIL) while the current one is batched and the model computes
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stream") if prefetch else None

    def close(self) -> None:
        """Stop the prefetch thread (also done when the batcher is garbage-collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def row_groups_read(self) -> int:
        return len(self.pieces_read)

    def _open(self) -> None:
        if self._src is None:
            self._src = open_source(self.plan.source, "data")
            self._frags = {f.path: f for f in self._src.fragments}

    def _load(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        """Training rows of ``piece``: bad and held-out rows removed, standardized, encoded."""
        self._open()
        cp = self.plan.columns
        table = _read_piece(self._src, self._frags, piece.path, piece.row_group, cp.columns,
                            "data")
        self.pieces_read.append((piece.path, piece.row_group))
        spans = _piece_spans(piece)
        conv = convert_table(table, spans, cp, self._dtype)
        if conv.reports and self.plan.on_bad_rows != "drop":
            raise DataError([r.message("data") for r in conv.reports])
        keep = ~conv.bad & ~holdout_mask(np.arange(piece.start, piece.start + table.num_rows),
                                         self.plan.seed, self.plan.val_fraction)
        x = conv.x if keep.all() else conv.x[keep]
        if self.plan.standardize:
            standardize_(x, self.plan.mean, self.plan.std)
        if conv.labels is not None:
            arrs = Arrays(x, conv.labels[keep], None, 0, spans, np.flatnonzero(keep))
            y = encode_or_raise(arrs, list(self.plan.classes), cp.target_names[0], "data")
        else:
            y = conv.y[keep]
        return x, y

    def _epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        b, cap = self.share, self.capacity
        bx, by = self._buf_x, self._buf_y
        if b == 0:
            for _ in range(self.steps_per_epoch):
                yield self._out_x[:0], self._out_y[:0], self.batch_size
            return
        rng = np.random.default_rng([*epoch_seed(self.seed, epoch), self.rank])
        queue = [self.assigned[i] for i in rng.permutation(len(self.assigned))]
        pending: Future | None = None

        def next_piece() -> tuple[np.ndarray, np.ndarray] | None:
            nonlocal pending
            if pending is not None:
                got, pending = pending.result(), None
            elif queue:
                got = self._load(queue.pop(0))
            else:
                return None
            if queue and self._pool is not None:
                pending = self._pool.submit(self._load, queue.pop(0))
            return got

        cur_x = cur_y = None
        pos = m = 0
        for step in range(self.steps_per_epoch):
            while m < cap:
                if cur_x is None or pos == len(cur_x):
                    got = next_piece()
                    if got is None:
                        break
                    cur_x, cur_y = got
                    pos = 0
                    continue
                k = min(cap - m, len(cur_x) - pos)
                bx[m:m + k] = cur_x[pos:pos + k]
                by[m:m + k] = cur_y[pos:pos + k]
                m += k
                pos += k
            if m < b:
                raise DataError(f"streaming: rank {self.rank} ran out of rows at epoch {epoch} "
                                f"step {step}; did {self.plan.source} change since the scan?")
            sel = rng.choice(m, size=b, replace=False)
            np.take(bx[:m], sel, axis=0, out=self._out_x, mode="clip")
            np.take(by[:m], sel, axis=0, out=self._out_y, mode="clip")
            # refill the holes below the new end from the unselected tail rows
            holes = np.sort(sel[sel < m - b])
            tail = np.setdiff1d(np.arange(m - b, m), sel, assume_unique=True)
            bx[holes] = bx[tail]
            by[holes] = by[tail]
            m -= b
            yield self._out_x, self._out_y, self.batch_size

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(x_local (b_r, d), y_local, global_count = B)`` of ``(epoch, step)``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        if self._pos != (epoch, step) or self._it is None:
            self._it = self._epoch(epoch)
            for _ in range(step):
                next(self._it)
        out = next(self._it)
        self._pos = (epoch, step + 1)
        return out

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """All ``steps_per_epoch`` batches of ``epoch`` in order."""
        for step in range(self.steps_per_epoch):
            yield self.batch(epoch, step)
