"""In-memory batches: one global permutation per epoch, one contiguous slice per rank.

Epoch e's order is ``permutation(n)`` drawn from the generator seeded with
``(seed, e)``; global batch s is rows ``order[s·B : (s+1)·B]`` (the last may be
short) with indices sorted, which keeps reads of the memory-mapped cache in
file order and does not change the batch's mean gradient. The global batch of
``c`` rows is cut with `numpy.array_split` semantics: rank r gets
``c // world + (r < c % world)`` consecutive rows. Concatenating every rank's
slice in rank order therefore reproduces the one-process batch exactly.
"""

from __future__ import annotations

import numpy as np

from distbackprop.data.errors import DataError


def rank_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s share of ``count`` rows (np.array_split semantics)."""
    q, r = divmod(count, world)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def epoch_seed(seed: int, epoch: int) -> list[int]:
    """SeedSequence entropy for an epoch's permutation (non-negative 64-bit words)."""
    return [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch) & 0xFFFFFFFFFFFFFFFF]


class Batcher:
    """Rank ``rank``'s slices of the global batches over rows ``x (n, d)``, ``y (n, ...)``.

    `batch` is a pure function of ``(epoch, step)`` (a resumed run sees the same
    batches). It gathers rows with ``np.take(..., out=)`` into two buffers
    allocated once; the arrays it returns are views of those buffers, valid
    until the next call.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        if len(x) != len(y):
            raise DataError(f"batcher: x has {len(x)} rows but y has {len(y)}")
        if len(x) == 0:
            raise DataError("batcher: no rows")
        if batch_size <= 0:
            raise DataError(f"batch_size: must be > 0, got {batch_size}")
        if not 0 <= rank < world:
            raise DataError(f"batcher: rank {rank} outside world of {world}")
        self.x, self.y = x, y
        self.n = len(x)
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.steps_per_epoch = -(-self.n // self.batch_size)
        cap = -(-min(self.batch_size, self.n) // self.world)
        self._xbuf = np.empty((cap,) + x.shape[1:], dtype=x.dtype)
        self._ybuf = np.empty((cap,) + y.shape[1:], dtype=y.dtype)
        self._epoch: int | None = None
        self._order: np.ndarray | None = None

    def order(self, epoch: int) -> np.ndarray:
        """``(n,)`` row order of ``epoch``: the permutation, sorted within each global batch."""
        if self._epoch != epoch:
            perm = np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(self.n)
            full = (self.n // self.batch_size) * self.batch_size
            perm[:full].reshape(-1, self.batch_size).sort(axis=1)
            perm[full:].sort()
            self._epoch, self._order = epoch, perm
        return self._order

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """Row indices of global batch ``step`` of ``epoch`` (every rank's rows, in order)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        b = self.batch_size
        return self.order(epoch)[step * b:(step + 1) * b]

    def indices(self, epoch: int, step: int) -> tuple[np.ndarray, int]:
        """``(this rank's row indices, global batch size)`` of ``(epoch, step)``."""
        idx = self.global_indices(epoch, step)
        start, stop = rank_bounds(len(idx), self.rank, self.world)
        return idx[start:stop], len(idx)

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(x_local (m, d), y_local (m, ...), global_count)``; m may be 0 for a tiny batch.

        Writes into the batcher's buffers (``np.take(..., out=)``; ``mode="clip"``
        avoids the extra copy ``mode="raise"`` makes, the indices being valid).
        """
        idx, count = self.indices(epoch, step)
        m = len(idx)
        xb, yb = self._xbuf[:m], self._ybuf[:m]
        np.take(self.x, idx, axis=0, out=xb, mode="clip")
        np.take(self.y, idx, axis=0, out=yb, mode="clip")
        return xb, yb, count
