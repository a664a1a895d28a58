"""`ParamBuffer`: one contiguous parameter array, one gradient array, named views.

The allreduce, the optimizer, clipping, checksums and checkpoints all work on
the two flat arrays; layers only ever see reshaped views of them, so nothing
is copied between backward and the update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


class ParamBuffer:
    """Flat `params` and `grads` arrays of `dtype`, carved into named views.

    `shapes` is an ordered iterable of ``(name, shape)``; each name gets the
    slice ``offsets[name]`` of both arrays, reshaped C-contiguously.
    """

    def __init__(self, shapes: Iterable[tuple[str, tuple[int, ...]]], dtype=np.float64):
        self.dtype = np.dtype(dtype)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offsets: dict[str, slice] = {}
        n = 0
        for name, shape in shapes:
            if name in self.shapes:
                raise ValueError(f"duplicate parameter name {name!r}")
            size = math.prod(shape)
            self.shapes[name] = tuple(shape)
            self.offsets[name] = slice(n, n + size)
            n += size
        self.size = n
        self.params = np.zeros(n, dtype=self.dtype)
        self.grads = np.zeros(n, dtype=self.dtype)

    def param(self, name: str) -> np.ndarray:
        """View of parameter `name` (shares memory with `params`)."""
        return self.params[self.offsets[name]].reshape(self.shapes[name])

    def grad(self, name: str) -> np.ndarray:
        """View of gradient `name` (shares memory with `grads`)."""
        return self.grads[self.offsets[name]].reshape(self.shapes[name])

    def named_params(self) -> dict[str, np.ndarray]:
        return {k: self.param(k) for k in self.shapes}

    def named_grads(self) -> dict[str, np.ndarray]:
        return {k: self.grad(k) for k in self.shapes}

    def zero_grad_(self) -> None:
        """Zero the gradient buffer in place."""
        self.grads.fill(0)

    def span(self, names: Iterable[str]) -> slice:
        """The smallest slice covering `names` (contiguous when they are adjacent)."""
        sl = [self.offsets[n] for n in names]
        return slice(min(s.start for s in sl), max(s.stop for s in sl))
