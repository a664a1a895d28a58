"""Layers: `Dense` and the activations, each derivative beside its forward.

Batched convention: rows are examples. ``x`` is ``(batch, in_features)``,
``z = x Wᵀ + b`` is ``(batch, out_features)`` — the seed's ``z = W x + b``
applied to every row, with ``W`` of shape ``(out, in)``.

`forward` caches exactly what `backward` needs; `backward` consumes the
cache and releases it. Outputs go into per-layer workspaces that grow to the
largest batch seen and are reused (views ``[:batch]``), so a training step
allocates no new arrays once warmed up.
"""

from __future__ import annotations

import numpy as np


class _Workspace:
    """Grow-only scratch arrays of shape ``(rows, width)``; ``get`` returns ``[:rows]`` views."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, rows: int, width: int) -> np.ndarray:
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != width:
            buf = np.empty((max(rows, 1), width), dtype=self.dtype)
            self._bufs[key] = buf
        return buf[:rows]

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())


class Layer:
    """Base: ``forward(x) -> y`` caches; ``backward(dy) -> dx`` fills gradient views."""

    name: str = ""

    def forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        raise NotImplementedError  # pragma: no cover - interface

    def cached(self) -> list[np.ndarray]:
        """Arrays currently held for backward (for activation-memory accounting)."""
        return []

    def release_(self) -> None:
        """Drop the forward cache without a backward."""


class Dense(Layer):
    """z = x Wᵀ + b; backward: dW = dzᵀ x, db = Σ_batch dz, dx = dz W.

    `W (out, in)`, `b (out,)`, `dW`, `db` are views into the model's flat
    buffers; backward writes the gradients straight into them (overwrite, not
    accumulate).
    """

    def __init__(self, name: str, W: np.ndarray, b: np.ndarray, dW: np.ndarray, db: np.ndarray):
        self.name = name
        self.W, self.b, self.dW, self.db = W, b, dW, db
        self.out_features, self.in_features = W.shape
        self._ws = _Workspace(W.dtype)
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (batch, in) → z: (batch, out); caches x (a reference, not a copy)."""
        z = self._ws.get("z", x.shape[0], self.out_features)
        np.matmul(x, self.W.T, out=z)
        z += self.b
        self._x = x
        return z

    def backward(self, dz: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """dz: (batch, out) → dx: (batch, in); writes dW = dzᵀ x and db = Σ dz."""
        x = self._x
        if x is None:
            raise RuntimeError(f"{self.name}: backward without a forward")
        np.matmul(dz.T, x, out=self.dW)
        np.sum(dz, axis=0, out=self.db)
        self._x = None
        if not need_dx:
            return None
        dx = self._ws.get("dx", dz.shape[0], self.in_features)
        np.matmul(dz, self.W, out=dx)
        return dx

    def cached(self) -> list[np.ndarray]:
        return [] if self._x is None else [self._x]

    def release_(self) -> None:
        self._x = None


class Activation(Layer):
    """h = σ(z) elementwise; backward: dz = dh ⊙ σ′(z).

    Subclasses whose derivative is a function of the output (relu, leaky relu,
    sigmoid, tanh) cache h only; the others (softplus, gelu) cache z.
    """

    uses_output = True

    def __init__(self, name: str = "", dtype=np.float64):
        self.name = name
        self._ws = _Workspace(dtype)
        self._cache: np.ndarray | None = None

    def forward(self, z: np.ndarray) -> np.ndarray:
        h = self._ws.get("h", z.shape[0], z.shape[1])
        self._apply(z, h)
        self._cache = h if self.uses_output else z
        return h

    def backward(self, dh: np.ndarray, need_dx: bool = True) -> np.ndarray:
        c = self._cache
        if c is None:
            raise RuntimeError(f"{self.name}: backward without a forward")
        dz = self._ws.get("dz", dh.shape[0], dh.shape[1])
        self._grad(c, dh, dz)
        self._cache = None
        return dz

    def derivative(self, z: np.ndarray) -> np.ndarray:
        """σ′(z), elementwise (used by `local_jacobian` and tests)."""
        h = np.empty_like(z)
        self._apply(z, h)
        ones = np.ones_like(z)
        out = np.empty_like(z)
        self._grad(h if self.uses_output else z, ones, out)
        return out

    def cached(self) -> list[np.ndarray]:
        return [] if self._cache is None else [self._cache]

    def release_(self) -> None:
        self._cache = None

    # h ← σ(z) ; dz ← dh ⊙ σ′ from the cache
    def _apply(self, z: np.ndarray, h: np.ndarray) -> None:  # pragma: no cover
        raise NotImplementedError

    def _grad(self, c: np.ndarray, dh: np.ndarray, dz: np.ndarray) -> None:  # pragma: no cover
        raise NotImplementedError


class Identity(Activation):
    """h = z; σ′ = 1."""

    def _apply(self, z, h):
        np.copyto(h, z)

    def _grad(self, c, dh, dz):
        np.copyto(dz, dh)


class ReLU(Activation):
    """h = max(z, 0); σ′(z) = [z > 0] = [h > 0]."""

    def _apply(self, z, h):
        np.maximum(z, 0, out=h)

    def _grad(self, h, dh, dz):
        np.greater(h, 0, out=dz)
        dz *= dh


class LeakyReLU(Activation):
    """h = z if z > 0 else α z (α = 0.01); σ′ = 1 or α, read from the sign of h."""

    def __init__(self, name: str = "", dtype=np.float64, alpha: float = 0.01):
        super().__init__(name, dtype)
        self.alpha = alpha

    def _apply(self, z, h):
        np.multiply(z, self.alpha, out=h)
        np.maximum(z, h, out=h)

    def _grad(self, h, dh, dz):
        np.greater(h, 0, out=dz)
        dz *= 1.0 - self.alpha
        dz += self.alpha
        dz *= dh


class Sigmoid(Activation):
    """h = 1/(1+e^{−z}), stable for large |z| (no overflow); σ′ = h(1 − h)."""

    def _apply(self, z, h):
        # σ(z) = (1 + tanh(z/2))/2 never overflows.
        np.multiply(z, 0.5, out=h)
        np.tanh(h, out=h)
        h += 1.0
        h *= 0.5

    def _grad(self, h, dh, dz):
        np.subtract(1.0, h, out=dz)
        dz *= h
        dz *= dh


class Tanh(Activation):
    """h = tanh(z); σ′ = 1 − h²."""

    def _apply(self, z, h):
        np.tanh(z, out=h)

    def _grad(self, h, dh, dz):
        np.multiply(h, h, out=dz)
        np.subtract(1.0, dz, out=dz)
        dz *= dh


class Softplus(Activation):
    """h = log(1 + eᶻ) = max(z, 0) + log1p(e^{−|z|}) (stable); σ′(z) = sigmoid(z)."""

    uses_output = False

    def _apply(self, z, h):
        np.abs(z, out=h)
        np.negative(h, out=h)
        np.exp(h, out=h)
        np.log1p(h, out=h)
        h += np.maximum(z, 0)

    def _grad(self, z, dh, dz):
        np.multiply(z, 0.5, out=dz)
        np.tanh(dz, out=dz)
        dz += 1.0
        dz *= 0.5
        dz *= dh


class GELU(Activation):
    """GELU, tanh form (Hendrycks & Gimpel): h = ½ z (1 + tanh(u)), u = √(2/π)(z + 0.044715 z³).

    σ′(z) = ½(1 + tanh u) + ½ z (1 − tanh² u) √(2/π)(1 + 3·0.044715 z²).
    """

    uses_output = False
    _C = float(np.sqrt(2.0 / np.pi))
    _A = 0.044715

    def _apply(self, z, h):
        t = np.tanh(self._C * (z + self._A * z**3))
        np.multiply(0.5 * z, 1.0 + t, out=h)

    def _grad(self, z, dh, dz):
        t = np.tanh(self._C * (z + self._A * z**3))
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * self._C * (1.0 + 3 * self._A * z * z)
        np.multiply(d, dh, out=dz)


ACTIVATIONS: dict[str, type[Activation]] = {
    "identity": Identity,
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "softplus": Softplus,
    "gelu": GELU,
}


def make_activation(name: str, layer_name: str = "", dtype=np.float64) -> Activation:
    """Activation by name (see `ACTIVATIONS`)."""
    try:
        cls = ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation: {name!r} is not one of {', '.join(ACTIVATIONS)}") from None
    return cls(layer_name, dtype)
