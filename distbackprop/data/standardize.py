"""Standardization statistics over training rows: x' = (x − μ) / σ, per feature."""

from __future__ import annotations

import numpy as np

_BLOCK_ROWS = 1 << 15
# float64 deviations of a block are a temporary: 4096 × 784 × 8 B ≈ 25 MB at most
_STATS_ROWS = 4096


class RunningStats:
    """Per-feature count, mean and M2 = Σ(x − μ)², merged block by block in float64.

    Blocks merge with Chan et al.'s pairwise update
    (μ = μ_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n, δ = μ_b − μ_a), so the
    statistics of a dataset streamed in pieces equal those of the whole.
    """

    def __init__(self, n_features: int):
        self.n = 0
        self.mean = np.zeros(n_features, dtype=np.float64)
        self.m2 = np.zeros(n_features, dtype=np.float64)
        self.min = np.full(n_features, np.inf)
        self.max = np.full(n_features, -np.inf)

    def update_(self, x: np.ndarray) -> None:
        """Fold rows ``x`` (rows, n_features) into the statistics (mutates self)."""
        for r0 in range(0, x.shape[0], _STATS_ROWS):
            blk = x[r0:r0 + _STATS_ROWS]
            nb = blk.shape[0]
            if nb == 0:
                continue
            mb = blk.mean(axis=0, dtype=np.float64)
            # deviations in the data's dtype (half the traffic for float32), from the
            # rounded mean m'; Σ(x − m')² = Σ(x − mb)² + n·(mb − m')² recovers M2 exactly
            m_round = mb.astype(blk.dtype) if np.issubdtype(blk.dtype, np.floating) else mb
            dev = blk - m_round
            shift = mb - m_round
            m2b = np.einsum("ij,ij->j", dev, dev, dtype=np.float64) - nb * shift * shift
            np.minimum(self.min, blk.min(axis=0), out=self.min)
            np.maximum(self.max, blk.max(axis=0), out=self.max)
            n = self.n + nb
            delta = mb - self.mean
            self.mean += delta * (nb / n)
            self.m2 += m2b + delta * delta * (self.n * nb / n)
            self.n = n

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean (d,), std (d,))``; σ is the population std, 1 for a constant column.

        A constant column (min == max) keeps σ = 1 so it maps to exactly 0
        instead of dividing rounding noise by rounding noise.
        """
        if self.n == 0:
            return np.zeros_like(self.mean), np.ones_like(self.mean)
        std = np.sqrt(self.m2 / self.n)
        std[(self.max <= self.min) | ~(std > 0)] = 1.0
        return self.mean.copy(), std


def standardize_(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """In place: x ← (x − mean) / std, row block by row block; returns ``x``."""
    m = np.asarray(mean, dtype=x.dtype)
    s = np.asarray(std, dtype=x.dtype)
    for r0 in range(0, x.shape[0], _BLOCK_ROWS):
        blk = x[r0:r0 + _BLOCK_ROWS]
        np.subtract(blk, m, out=blk)
        np.divide(blk, s, out=blk)
    return x
