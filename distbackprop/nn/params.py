"""`ParamBuffer`: one contiguous parameter array, one gradient array, named views.

The allreduce, the optimizer, clipping, checksums and checkpoints all work on
the two flat arrays; layers only ever see reshaped views of them, so nothing
is copied between backward and the update.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..atomic import atomic_path

MODEL_FORMAT = 1

# (n, dtype) -> (params, grads): where a ParamBuffer's two flat arrays live
Storage = Callable[[int, np.dtype], tuple[np.ndarray, np.ndarray]]


class ParamBuffer:
    """Flat `params` and `grads` arrays of `dtype`, carved into named views.

    `shapes` is an ordered iterable of ``(name, shape)``; each name gets the
    slice ``offsets[name]`` of both arrays, reshaped C-contiguously. `storage`, given
    (n, dtype), returns the two (n,) arrays to carve instead of new zeroed ones (e.g.
    memory shared with other processes).
    """

    def __init__(self, shapes: Iterable[tuple[str, tuple[int, ...]]], dtype=np.float64,
                 storage: Storage | None = None):
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
        if storage is None:
            self.params = np.zeros(n, dtype=self.dtype)
            self.grads = np.zeros(n, dtype=self.dtype)
        else:
            self.params, self.grads = storage(n, self.dtype)
            for what, a in (("params", self.params), ("grads", self.grads)):
                if a.shape != (n,) or a.dtype != self.dtype or not a.flags.c_contiguous:
                    raise ValueError(f"storage: {what} must be a contiguous ({n},) "
                                     f"{self.dtype} array, got {a.shape} {a.dtype}")

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


class FlatModel:
    """What every model over one `ParamBuffer` (``self.buffer``) exposes — the one protocol
    the runtime, checkpoints, ``model.npz``, evaluate, predict and gradcheck rely on.

    Subclasses name their layers' parameters in `layer_params` (layer order);
    the flat buffers, named views and per-layer slices follow from it. They also provide
    ``forward(x) → ŷ`` on rows ``x (batch, n_in)`` giving ``(batch, n_out)``,
    ``backward(dy, on_layer_done=None)``, ``loss_and_grad(x, y, loss, denom)``,
    ``predict(x)``, ``activation_bytes()``, ``release_()`` and ``architecture()`` (a JSON
    mapping `load_model` rebuilds the model from).
    """

    buffer: ParamBuffer

    def layer_params(self) -> dict[str, list[str]]:
        """{layer: [parameter names]} in layer order; each layer's names are adjacent."""
        raise NotImplementedError  # pragma: no cover - interface

    @property
    def params(self) -> np.ndarray:
        return self.buffer.params

    @property
    def grads(self) -> np.ndarray:
        return self.buffer.grads

    @property
    def dtype(self) -> np.dtype:
        return self.buffer.dtype

    @property
    def layer_names(self) -> list[str]:
        return list(self.layer_params())

    def named_params(self) -> dict[str, np.ndarray]:
        """Ordered {"dense0.W": view, ...} sharing memory with `params`."""
        return self.buffer.named_params()

    def named_grads(self) -> dict[str, np.ndarray]:
        return self.buffer.named_grads()

    @property
    def output_width(self) -> int:
        """Columns of `forward`'s ŷ per row."""
        raise NotImplementedError  # pragma: no cover - interface

    def predict(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """ŷ for all rows of x, in batches; a new (n, output_width) array."""
        out = np.empty((x.shape[0], self.output_width), dtype=self.dtype)
        for i in range(0, x.shape[0], batch):
            out[i:i + batch] = self.forward(x[i:i + batch])
        self.release_()
        return out

    def layer_slices(self) -> dict[str, slice]:
        """{layer: slice} over the flat buffers, covering all of that layer's parameters."""
        return {n: self.buffer.span(names) for n, names in self.layer_params().items()}

    def zero_grad_(self) -> None:
        """Zero the gradient buffer in place."""
        self.buffer.zero_grad_()

    def architecture(self) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover - interface

    def save(self, path: str | os.PathLike, meta: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | None = None) -> None:
        """Write an ``.npz`` without pickles: params, architecture + `meta` as JSON bytes.

        Written through `distbackprop.atomic`, so a reader never sees half a model.
        """
        meta = dict(meta or {})
        # Arrays in `meta` (e.g. standardization mean/std) travel as npz members.
        meta_arrays = {k: meta.pop(k) for k in list(meta) if isinstance(meta[k], np.ndarray)}
        header = {"format": MODEL_FORMAT, "architecture": self.architecture(), "meta": meta}
        payload = {"params": self.params,
                   "header_json": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        payload.update({f"meta/{k}": v for k, v in meta_arrays.items()})
        for k, v in (arrays or {}).items():
            payload[f"extra/{k}"] = np.asarray(v)
        # A file object, not a name: np.savez appends ".npz" to names lacking it.
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **payload)
