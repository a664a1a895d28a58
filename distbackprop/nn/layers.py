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

    def workspace_bytes(self) -> int:
        """Bytes of the scratch buffers this layer has allocated (grow-only)."""
        return 0


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

    def workspace_bytes(self) -> int:
        return self._ws.nbytes()


class Activation(Layer):
    """h = σ(z) elementwise; backward: dz = dh ⊙ σ′(z). z, h, dh, dz: (batch, width).

    The public protocol every activation implements, value and derivatives side by side
    (`remat`, `hessian` and `jacobian` call only these):

    - ``apply_(z, out)``: out ← σ(z);
    - ``grad_(cache, dh, dz)``: dz ← dh ⊙ σ′(z), where `cache` is h = σ(z) if
      `uses_output` else z (what `forward` keeps for backward);
    - ``second(z)``: σ″(z) as a new array, or None when σ″ = 0 wherever it exists;
    - ``derivative(z)``: σ′(z) as a new array;
    - ``workspace_bytes()``: bytes of this layer's scratch buffers.

    Attributes: `uses_output` (cache h, else z); `kinks`, the points where σ is not
    differentiable — σ′ there is the convention stated in each class's docstring, and
    `gradcheck` reports parameters whose finite-difference stencil crosses one;
    `straight_through`, True when backward is a surrogate rather than σ′ (an STE).
    """

    uses_output = True
    kinks: tuple[float, ...] = ()
    straight_through = False

    def __init__(self, name: str = "", dtype=np.float64):
        self.name = name
        self._ws = _Workspace(dtype)
        self._cache: np.ndarray | None = None

    def forward(self, z: np.ndarray) -> np.ndarray:
        h = self._ws.get("h", z.shape[0], z.shape[1])
        self.apply_(z, h)
        self._cache = h if self.uses_output else z
        return h

    def backward(self, dh: np.ndarray, need_dx: bool = True) -> np.ndarray:
        c = self._cache
        if c is None:
            raise RuntimeError(f"{self.name}: backward without a forward")
        dz = self._ws.get("dz", dh.shape[0], dh.shape[1])
        self.grad_(c, dh, dz)
        self._cache = None
        return dz

    def derivative(self, z: np.ndarray) -> np.ndarray:
        """σ′(z), elementwise, as a new array (the backward's own arithmetic, dh = 1)."""
        h = np.empty_like(z)
        self.apply_(z, h)
        ones = np.ones_like(z)
        out = np.empty_like(z)
        self.grad_(h if self.uses_output else z, ones, out)
        return out

    def cached(self) -> list[np.ndarray]:
        return [] if self._cache is None else [self._cache]

    def release_(self) -> None:
        self._cache = None

    def workspace_bytes(self) -> int:
        return self._ws.nbytes()

    def apply_(self, z: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - interface
        """out ← σ(z); z, out: (batch, width)."""
        raise NotImplementedError

    def grad_(self, cache: np.ndarray, dh: np.ndarray,
              dz: np.ndarray) -> None:  # pragma: no cover - interface
        """dz ← dh ⊙ σ′(z); `cache` is σ(z) if `uses_output` else z. All (batch, width)."""
        raise NotImplementedError

    def second(self, z: np.ndarray) -> np.ndarray | None:
        """σ″(z): (batch, width) → (batch, width), or None: σ″ = 0 wherever it exists
        (piecewise-linear or piecewise-constant σ)."""
        return None


class Identity(Activation):
    """h = z; σ′ = 1; σ″ = 0. No kinks."""

    def apply_(self, z, out):
        np.copyto(out, z)

    def grad_(self, cache, dh, dz):
        np.copyto(dz, dh)


class ReLU(Activation):
    """h = max(z, 0); σ′(z) = 1{z > 0} = 1{h > 0}, so relu′(0) = 0; σ″ = 0. Kink: 0."""

    kinks = (0.0,)

    def apply_(self, z, out):
        np.maximum(z, 0, out=out)

    def grad_(self, cache, dh, dz):
        np.greater(cache, 0, out=dz)
        dz *= dh


class LeakyReLU(Activation):
    """h = z if z > 0 else α z (α = 0.01); σ′ = 1 if z > 0 else α, read from the sign of h,
    so leaky_relu′(0) = α (the leak); σ″ = 0. Kink: 0."""

    kinks = (0.0,)

    def __init__(self, name: str = "", dtype=np.float64, alpha: float = 0.01):
        super().__init__(name, dtype)
        self.alpha = alpha

    def apply_(self, z, out):
        np.multiply(z, self.alpha, out=out)
        np.maximum(z, out, out=out)

    def grad_(self, cache, dh, dz):
        np.greater(cache, 0, out=dz)
        dz *= 1.0 - self.alpha
        dz += self.alpha
        dz *= dh


class Sigmoid(Activation):
    """h = 1/(1+e^{−z}), stable for large |z| (no overflow); σ′ = h(1 − h); σ″ = σ′(1 − 2h)."""

    def apply_(self, z, out):
        # σ(z) = (1 + tanh(z/2))/2 never overflows.
        np.multiply(z, 0.5, out=out)
        np.tanh(out, out=out)
        out += 1.0
        out *= 0.5

    def grad_(self, cache, dh, dz):
        np.subtract(1.0, cache, out=dz)
        dz *= cache
        dz *= dh

    def second(self, z):
        h = np.empty_like(z)
        self.apply_(z, h)
        d1 = h * (1.0 - h)
        return d1 * (1.0 - 2.0 * h)


class Tanh(Activation):
    """h = tanh(z); σ′ = 1 − h²; σ″ = −2hσ′."""

    def apply_(self, z, out):
        np.tanh(z, out=out)

    def grad_(self, cache, dh, dz):
        np.multiply(cache, cache, out=dz)
        np.subtract(1.0, dz, out=dz)
        dz *= dh

    def second(self, z):
        h = np.tanh(z)
        d1 = 1.0 - h * h
        return -2.0 * h * d1


class Softplus(Activation):
    """h = log(1 + eᶻ) = max(z, 0) + log1p(e^{−|z|}) (stable); σ′(z) = s = sigmoid(z);
    σ″ = s(1 − s)."""

    uses_output = False

    def apply_(self, z, out):
        np.abs(z, out=out)
        np.negative(out, out=out)
        np.exp(out, out=out)
        np.log1p(out, out=out)
        out += np.maximum(z, 0)

    def grad_(self, cache, dh, dz):
        np.multiply(cache, 0.5, out=dz)
        np.tanh(dz, out=dz)
        dz += 1.0
        dz *= 0.5
        dz *= dh

    def second(self, z):
        s = 0.5 * (1.0 + np.tanh(0.5 * z))
        return s * (1.0 - s)


class GELU(Activation):
    """GELU, tanh form (Hendrycks & Gimpel): h = ½ z (1 + tanh(u)), u = √(2/π)(z + 0.044715 z³).

    σ′(z) = ½(1 + tanh u) + ½ z (1 − tanh² u) u′ with u′ = √(2/π)(1 + 3·0.044715 z²);
    σ″(z) = (1 − tanh² u)(u′ − z tanh(u) u′² + 3 √(2/π) 0.044715 z²).
    """

    uses_output = False
    C = float(np.sqrt(2.0 / np.pi))
    A = 0.044715

    def apply_(self, z, out):
        t = np.tanh(self.C * (z + self.A * z**3))
        np.multiply(0.5 * z, 1.0 + t, out=out)

    def grad_(self, cache, dh, dz):
        z = cache
        t = np.tanh(self.C * (z + self.A * z**3))
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * self.C * (1.0 + 3 * self.A * z * z)
        np.multiply(d, dh, out=dz)

    def second(self, z):
        c, a = self.C, self.A
        du = c * (1.0 + 3.0 * a * z * z)
        t = np.tanh(c * (z + a * z**3))
        sech2 = 1.0 - t * t
        return sech2 * (du - z * t * du * du + 3.0 * c * a * z * z)


def _window_grad_(z: np.ndarray, dh: np.ndarray, dz: np.ndarray) -> None:
    """dz ← dh ⊙ 1{|z| ≤ 1}: closed at ±1, the one window hardtanh and the STEs share."""
    np.abs(z, out=dz)
    np.less_equal(dz, 1.0, out=dz)
    dz *= dh


class HardTanh(Activation):
    """h = clip(z, −1, 1); σ′(z) = 1{|z| ≤ 1}, closed window: hardtanh′(±1) = 1; σ″ = 0.

    Kinks: −1 and +1. σ′ needs z (from h = ±1 one cannot tell z = 1 from z = 2), so z is cached.
    """

    uses_output = False
    kinks = (-1.0, 1.0)

    def apply_(self, z, out):
        np.clip(z, -1.0, 1.0, out=out)

    def grad_(self, cache, dh, dz):
        _window_grad_(cache, dh, dz)


class Sign(Activation):
    """Binarization with a straight-through estimator (Bengio et al. 2013; Hubara et al. 2016).

    Forward h = sign(z) with sign(0) = +1 (so h ∈ {−1, +1}; NaN stays NaN). Backward is the
    surrogate dz = dh ⊙ 1{|z| ≤ 1} — hardtanh's derivative, same closed window, so the
    gradient through sign equals the gradient through hardtanh at the same z. σ″ = 0.
    Kinks: 0 (the jump) and ±1 (the window's edges; the surrogate is 1 there).
    """

    uses_output = False
    kinks = (-1.0, 0.0, 1.0)
    straight_through = True

    def apply_(self, z, out):
        np.sign(z, out=out)
        out[out == 0] = 1.0  # sign(±0) = +1: binary units take two values, never three

    def grad_(self, cache, dh, dz):
        _window_grad_(cache, dh, dz)


class Round(Activation):
    """Uniform K-bit quantization with a straight-through estimator.

    Forward: n = 2ᴷ levels −1 + 2j/(n−1), j = 0…n−1, spread over [−1, 1];
    h = −1 + 2·⌊(clip(z, −1, 1) + 1)/2 · (n−1) + ½⌋ / (n−1), ties rounding up (towards +1),
    so K = 1 is exactly `Sign`. Backward is the surrogate dz = dh ⊙ 1{|z| ≤ 1} (as `Sign`).
    σ″ = 0. Kinks: the n − 1 jumps −1 + (2j+1)/(n−1), j = 0…n−2, and the window's edges ±1.
    """

    uses_output = False
    straight_through = True

    def __init__(self, name: str = "", dtype=np.float64, quantize_bits: int = 1):
        super().__init__(name, dtype)
        self.quantize_bits = check_quantize_bits(quantize_bits)
        self.steps = (1 << self.quantize_bits) - 1  # n − 1 intervals between n levels
        jumps = [-1.0 + (2 * j + 1) / self.steps for j in range(self.steps)]
        self.kinks = tuple(sorted({-1.0, 1.0, *jumps}))

    def apply_(self, z, out):
        np.clip(z, -1.0, 1.0, out=out)
        out += 1.0
        out *= 0.5 * self.steps
        out += 0.5
        np.floor(out, out=out)
        out *= 2.0 / self.steps
        out -= 1.0

    def grad_(self, cache, dh, dz):
        _window_grad_(cache, dh, dz)


def check_quantize_bits(quantize_bits: object) -> int:
    """K as an int in 1..16, or ValueError naming `quantize_bits`."""
    if (isinstance(quantize_bits, bool) or not isinstance(quantize_bits, int | np.integer)
            or not 1 <= int(quantize_bits) <= 16):
        raise ValueError(f"quantize_bits: must be an integer in 1..16, got {quantize_bits!r}")
    return int(quantize_bits)


# Backward is σ′ (gradcheck and the Hessian's finite differences apply).
ACTIVATIONS: dict[str, type[Activation]] = {
    "identity": Identity,
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "softplus": Softplus,
    "gelu": GELU,
    "hardtanh": HardTanh,
}
# Backward is a surrogate: the forward is piecewise constant, its true derivative 0 a.e.
STRAIGHT_THROUGH: dict[str, type[Activation]] = {
    "sign": Sign,
    "round": Round,
}


def make_activation(name: str, layer_name: str = "", dtype=np.float64,
                    quantize_bits: int | None = None) -> Activation:
    """Activation by name (`ACTIVATIONS` or `STRAIGHT_THROUGH`); `quantize_bits` K is
    required by "round" and refused by every other activation."""
    cls = ACTIVATIONS.get(name) or STRAIGHT_THROUGH.get(name)
    if cls is None:
        raise ValueError(f"activation: {name!r} is not one of "
                         f"{', '.join([*ACTIVATIONS, *STRAIGHT_THROUGH])}")
    if cls is Round:
        if quantize_bits is None:
            raise ValueError("quantize_bits: required with activation 'round' (K in 1..16)")
        return Round(layer_name, dtype, quantize_bits)
    if quantize_bits is not None:
        raise ValueError(f"quantize_bits: only meaningful with activation 'round', "
                         f"not {name!r}")
    return cls(layer_name, dtype)
