"""Gradient-health statistics, computed once per step on the reduced gradient (NumPy only).

Per layer ℓ (its W and b are one contiguous slice of the flat buffer):

    ‖g_ℓ‖ = sqrt(Σ_i g_i²)                     per-layer L2 norm (W and b together)
    ‖g‖   = sqrt(Σ_ℓ ‖g_ℓ‖²)                   global norm
    r_ℓ   = ‖Δθ_ℓ‖ / ‖θ_ℓ‖                     update ratio (CS231n's rule of thumb: ~1e-3)

The detection rule (`classify`), per layer and per step:

* **vanishing** when ``‖g_ℓ‖ < vanish_threshold`` (default 1e-7). Vanishing is a
  depth effect: the first layers of a deep sigmoid net get gradients many orders
  of magnitude below the last ones, while the global norm — dominated by the
  last layers — looks healthy. Only a per-layer norm shows it. An absolute
  threshold is used because below ~1e-7 (float32's relative precision) an update
  ``lr·g`` no longer changes weights of order one: the layer has stopped learning.
  ``vanish_threshold=0`` turns the detector off (no norm is below 0).
* **exploding** when ``‖g_ℓ‖ > explode_threshold`` (default 1e3) **or** the
  layer's gradient holds a non-finite value. Inf and NaN are where an explosion
  ends (overflow, then inf − inf), and a NaN norm compares False with every
  threshold, so without the second clause the worst case would pass silently.

Both thresholds are `TrainConfig` fields (``--vanish-threshold``,
``--explode-threshold``); the rule itself is the function below.

Cost: `grad_health` reads a gradient once (a numba kernel: Σg² per layer
accumulated in float64, max |g| from the bit patterns), and the sharded update's
block sum over the ranks' gradients takes its health in the same pass
(`sum_health`). The NumPy path (per-layer norms, update ratios, and any
gradient with a non-finite entry) uses the BLAS dot of each slice with itself
— no full-size temporary. float64 buffers are summed in float64. float32
buffers use the float32 dot (relative error ~1e-7·log n, far below what the
thresholds resolve) and are re-summed in float64 (buffered, still without a
full-size temporary) whenever the float32 result could have under- or
overflowed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

PHASES: tuple[str, ...] = ("data", "forward", "backward", "allreduce", "update")

# Outside this range a float32 sum of squares may have lost values to
# underflow (squares below ~1e-45) or overflowed; re-sum in float64 there.
_F32_SAFE_LO = 1e-30
_F32_SAFE_HI = 1e30
# Block length for `update_ratios_between`'s scratch buffer: 64 KiB in float32.
_BLOCK = 16384


def _sumsq(x: np.ndarray) -> float:
    """Σ x_i² as a float, float64 arithmetic for float64 inputs, no full-size temporary.

    Callers silence float32 overflow warnings: overflow is detected and re-summed here.
    """
    s = float(np.dot(x, x))
    if x.dtype.char == "d" or (x.dtype.char == "f" and _F32_SAFE_LO < s < _F32_SAFE_HI):
        return s
    if x.size == 0:
        return 0.0
    # einsum casts through a small internal buffer, not a full copy.
    return float(np.einsum("i,i->", x, x, dtype=np.float64))


def _sumsq_per_layer(flat: np.ndarray, layer_slices: Mapping[str, slice]) -> list[float]:
    # Python floats, not a small array: with a handful of layers the per-call
    # overhead of NumPy on length-L arrays would cost more than the dots.
    if not isinstance(flat, np.ndarray):
        flat = np.asarray(flat)
    if flat.ndim != 1:
        raise ValueError(f"flat: expected a 1-D buffer, got shape {flat.shape}")
    if flat.dtype.char == "d":
        return [float(np.dot(x, x)) for x in map(flat.__getitem__, layer_slices.values())]
    # float32 overflow is expected and handled (re-summed in float64).
    with np.errstate(over="ignore", invalid="ignore"):
        return [_sumsq(x) for x in map(flat.__getitem__, layer_slices.values())]


def _sqrt(sq: list[float]) -> np.ndarray:
    return np.array([math.sqrt(v) for v in sq], dtype=np.float64)


def _contiguous_span(layer_slices: Mapping[str, slice], size: int) -> slice | None:
    """The one slice the layers tile without gaps, in order (the flat-buffer layout), or None."""
    start = stop = None
    for sl in layer_slices.values():
        a, b, step = sl.indices(size)
        if step != 1 or (stop is not None and a != stop):
            return None
        start = a if start is None else start
        stop = b
    return None if start is None else slice(start, stop)


def layer_norms(flat: np.ndarray, layer_slices: Mapping[str, slice]) -> np.ndarray:
    """Per-layer L2 norms ‖g_ℓ‖ = sqrt(Σ_{i∈ℓ} g_i²), float64, shape (L,).

    `flat`: 1-D buffer (params, grads or an update), shape (P,); `layer_slices`:
    {layer: slice} in layer order (`model.layer_slices()`). A slice holding a
    non-finite value gives a non-finite norm (inf or NaN).
    """
    return _sqrt(_sumsq_per_layer(flat, layer_slices))


def _ratios(num_sq: list[float], den_sq: list[float]) -> np.ndarray:
    """sqrt(num/den) per layer with 0/0 → 0 (nothing moved), x/0 → inf (a zero layer moved)."""
    out = []
    for n, d in zip(num_sq, den_sq, strict=True):
        if d > 0:
            out.append(math.sqrt(n) / math.sqrt(d))
        elif n == 0 and d == 0:
            out.append(0.0)
        elif d == 0:
            out.append(math.inf if n > 0 else math.nan)
        else:
            out.append(math.nan)
    return np.array(out, dtype=np.float64)


def update_ratios(delta: np.ndarray, params: np.ndarray,
                  layer_slices: Mapping[str, slice]) -> np.ndarray:
    """Update ratio r_ℓ = ‖Δθ_ℓ‖ / ‖θ_ℓ‖ per layer, float64, shape (L,).

    `delta`: the update Δθ applied this step, shape (P,); `params`: θ before the
    update, shape (P,). A layer with ‖θ_ℓ‖ = 0 gets 0 if it did not move, else inf.
    """
    return _ratios(_sumsq_per_layer(delta, layer_slices),
                   _sumsq_per_layer(params, layer_slices))


def update_ratios_between(before: np.ndarray, after: np.ndarray,
                          layer_slices: Mapping[str, slice]) -> np.ndarray:
    """r_ℓ = ‖after_ℓ − before_ℓ‖ / ‖before_ℓ‖ per layer, shape (L,), float64.

    For callers that keep a copy of θ from before the update instead of the update
    itself. The difference is formed block by block in a small scratch buffer.
    """
    before = np.asarray(before)
    after = np.asarray(after)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"before/after: need equal 1-D shapes, got {before.shape} "
                         f"and {after.shape}")
    scratch = np.empty(min(_BLOCK, before.size), dtype=np.result_type(before, after))
    num = []
    for sl in layer_slices.values():
        start, stop, _ = sl.indices(before.size)
        acc = 0.0
        for i in range(start, stop, _BLOCK):
            j = min(i + _BLOCK, stop)
            d = scratch[: j - i]
            with np.errstate(over="ignore", invalid="ignore"):
                np.subtract(after[i:j], before[i:j], out=d)
                acc += _sumsq(d)
        num.append(acc)
    return _ratios(num, _sumsq_per_layer(before, layer_slices))


# The int type whose bit patterns order |x| for each float dtype, and its sign mask.
_BITS = {np.dtype(np.float32): (np.int32, np.int32(0x7FFF_FFFF)),
         np.dtype(np.float64): (np.int64, np.int64(0x7FFF_FFFF_FFFF_FFFF))}


def _segments(layer_slices: Mapping[str, slice], size: int
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """(starts, stops) (L,) int64 of the layer slices, or None if one has a step; the same
    arrays for the same slices and size, so a step allocates none."""
    return _segments_of(tuple(sl.indices(size) for sl in layer_slices.values()))


@functools.lru_cache(maxsize=64)
def _segments_of(spans: tuple[tuple[int, int, int], ...]
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    if any(step != 1 for _, _, step in spans):
        return None
    # shared between calls: never written (left writable, the type the kernels are warmed for)
    return (np.array([a for a, _, _ in spans], np.int64),
            np.array([max(a, b) for a, b, _ in spans], np.int64))


def _health_from_kernel(sq: np.ndarray, mbits, dtype: np.dtype, count: int) -> dict | None:
    """`grad_health`'s result from the one-pass kernels' per-layer Σg² (float64) and the
    largest masked bit pattern; None when a sum is not finite (then some entry is not
    finite, or a float64 square overflowed: the caller takes the exact path)."""
    total = math.fsum(sq)
    if not math.isfinite(total):
        return None
    ints, _ = _BITS[dtype]
    max_abs = float(np.array(mbits, ints).view(dtype)) if count else math.nan
    return {
        "grad_global_norm": math.sqrt(total),
        "grad_norm": np.sqrt(sq),
        "grad_max_abs": max_abs,
        "nonfinite": 0,
        "nonfinite_per_layer": np.zeros(sq.size, dtype=np.int64),
    }


def _fast_health(grads: np.ndarray, layer_slices: Mapping[str, slice]) -> dict | None:
    if grads.dtype not in _BITS or grads.ndim != 1 or not grads.flags.c_contiguous:
        return None
    seg = _segments(layer_slices, grads.size)
    if seg is None:
        return None
    from ..kernels import health_
    ints, mask = _BITS[grads.dtype]
    sq = np.zeros(seg[0].size)
    m = health_(grads, grads.view(ints), seg[0], seg[1], sq, mask)
    return _health_from_kernel(sq, m, grads.dtype, int((seg[1] - seg[0]).sum()))


def sum_health(parts: Sequence[np.ndarray], lo: int, out: np.ndarray,
               layer_slices: Mapping[str, slice]) -> dict:
    """out (n,) ← Σ_k parts[k][lo:lo+n] (added in order k = 0, 1, …), and `grad_health(out)`.

    `parts`: ≥ 2 flat gradients (P,) of one dtype; `layer_slices` relative to lo; out may
    be one of parts[k][lo:lo+n] (the sum in place). In one pass through cache-sized blocks
    when the layers tile out (the sharded update's block sum); otherwise NumPy adds (into a
    temporary when out is a part), then `grad_health`. Either way out is the same to the
    bit."""
    n = out.size
    span = _contiguous_span(layer_slices, n)
    seg = _segments(layer_slices, n)
    if (len(parts) >= 2 and span == slice(0, n) and seg is not None and out.dtype in _BITS
            and all(p.dtype == out.dtype and p.ndim == 1 and p.flags.c_contiguous
                    for p in parts)):
        from ..kernels import BLOCK, sum_health_
        ints, mask = _BITS[out.dtype]
        sq = np.zeros(seg[0].size)
        # with 2 parts the kernel sums straight into out and never touches scratch
        scratch = np.empty(BLOCK, out.dtype) if len(parts) > 2 else out
        m = sum_health_(tuple(parts), lo, out, out.view(ints), seg[0], seg[1], sq, mask,
                        scratch)
        h = _health_from_kernel(sq, m, out.dtype, n)
        return h if h is not None else _exact_health(out, layer_slices)
    total = parts[0][lo:lo + n] + parts[1][lo:lo + n]
    for p in parts[2:]:
        np.add(total, p[lo:lo + n], out=total)
    out[...] = total
    return grad_health(out, layer_slices)


def grad_health(grads: np.ndarray, layer_slices: Mapping[str, slice]) -> dict:
    """Health of one (reduced) gradient, shape (P,).

    Returns ``grad_global_norm`` (float, sqrt(Σ_ℓ ‖g_ℓ‖²)), ``grad_norm`` ((L,) f64),
    ``grad_max_abs`` (float, max |g_i| over the finite entries; NaN if none),
    ``nonfinite`` (int, count of inf/NaN entries) and ``nonfinite_per_layer``
    ((L,) int64). Entries outside every layer slice are ignored.

    A contiguous float32/float64 gradient is read once by a numba kernel (`kernels.health_`:
    Σg² per layer in float64, max |g| from the bit patterns). When a sum is not finite, or
    for any other input, the exact path below counts the non-finite entries per layer.
    """
    if not isinstance(grads, np.ndarray):
        grads = np.asarray(grads)
    h = _fast_health(grads, layer_slices)
    return h if h is not None else _exact_health(grads, layer_slices)


def _exact_health(grads: np.ndarray, layer_slices: Mapping[str, slice]) -> dict:
    """`grad_health` with NumPy: BLAS dots, then a count of the non-finite entries of
    each layer whose sum of squares is not finite."""
    sq = _sumsq_per_layer(grads, layer_slices)
    total = math.fsum(sq) if len(sq) > 1 else (sq[0] if sq else 0.0)
    nonfinite_per_layer = np.zeros(len(sq), dtype=np.int64)
    nonfinite = 0
    if math.isfinite(total):
        # A finite sum of squares proves every entry finite: no element-wise check.
        span = _contiguous_span(layer_slices, grads.size)
        parts = [grads[span]] if span is not None else [grads[s] for s in layer_slices.values()]
        max_abs = -math.inf
        for p in parts:
            if p.size:
                max_abs = max(max_abs, float(p.max()), -float(p.min()))
        if max_abs == -math.inf:
            max_abs = math.nan
    else:
        max_abs = -math.inf
        for i, sl in enumerate(layer_slices.values()):
            g = grads[sl]
            if g.size == 0:
                continue
            if not math.isfinite(sq[i]):
                finite = np.isfinite(g)
                n_finite = int(np.count_nonzero(finite))
                nonfinite_per_layer[i] = g.size - n_finite
                if not n_finite:
                    continue
                g = g[finite]
            max_abs = max(max_abs, float(g.max()), -float(g.min()))
        if max_abs == -math.inf:
            max_abs = math.nan
        nonfinite = int(nonfinite_per_layer.sum())
    return {
        "grad_global_norm": math.sqrt(total) if total >= 0 else math.nan,
        "grad_norm": _sqrt(sq),
        "grad_max_abs": max_abs,
        "nonfinite": nonfinite,
        "nonfinite_per_layer": nonfinite_per_layer,
    }


def health_from_sums(sq: np.ndarray, max_abs: float,
                     nonfinite_per_layer: np.ndarray) -> dict:
    """`grad_health`'s result from per-layer Σg² (L,), max |g| and non-finite counts (L,)
    already reduced over the shards of a gradient split across ranks."""
    sq = [float(v) for v in sq]
    total = math.fsum(sq)
    per = np.asarray(nonfinite_per_layer, dtype=np.int64)
    return {
        "grad_global_norm": math.sqrt(total) if total >= 0 else math.nan,
        "grad_norm": _sqrt(sq) if all(v >= 0 for v in sq) else np.sqrt(np.asarray(sq)),
        "grad_max_abs": float(max_abs),
        "nonfinite": int(per.sum()),
        "nonfinite_per_layer": per,
    }


def classify(norms: np.ndarray, vanish_threshold: float, explode_threshold: float,
             nonfinite_per_layer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer detector (the rule in the module docstring).

    `norms`: per-layer gradient norms, shape (L,) or (K, L). Returns boolean
    arrays of the same shape: ``vanishing = norms < vanish_threshold`` and
    ``exploding = (norms > explode_threshold) | ~isfinite(norms) | (nonfinite > 0)``.
    """
    norms = np.asarray(norms, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        vanishing = norms < vanish_threshold
        exploding = (norms > explode_threshold) | ~np.isfinite(norms)
    if nonfinite_per_layer is not None:
        exploding |= np.asarray(nonfinite_per_layer) > 0
    return vanishing, exploding


class StepStats:
    """Preallocated per-step statistics for one chunk of up to `capacity` steps.

    Arrays (K = steps recorded, L = len(layers)): step, epoch, samples (K,) int64;
    loss, lr, grad_global_norm, grad_max_abs, step_seconds (K,) f64;
    grad_norm, update_ratio (K, L) f64; nonfinite (K,) int64; skipped (K,) bool;
    phase_seconds (K, len(PHASES)) f64 in PHASES order; sharpness (K,) f64 (NaN
    where not measured); for a model with time steps also time_grad_norm (K, buckets)
    f64, from ``health["time_grad_norm"]``. Nothing grows per step:
    `record` writes row K and `reset` rewinds.
    """

    def __init__(self, capacity: int, layers: Sequence[str]):
        if capacity <= 0:
            raise ValueError(f"capacity: must be > 0, got {capacity}")
        self.layers = list(layers)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        L = len(self.layers)
        self.capacity = capacity
        self.n = 0
        self.step = np.zeros(capacity, dtype=np.int64)
        self.epoch = np.zeros(capacity, dtype=np.int64)
        self.loss = np.zeros(capacity, dtype=np.float64)
        self.samples = np.zeros(capacity, dtype=np.int64)
        self.lr = np.zeros(capacity, dtype=np.float64)
        self.grad_global_norm = np.zeros(capacity, dtype=np.float64)
        self.grad_norm = np.zeros((capacity, L), dtype=np.float64)
        self.update_ratio = np.zeros((capacity, L), dtype=np.float64)
        self.grad_max_abs = np.zeros(capacity, dtype=np.float64)
        self.nonfinite = np.zeros(capacity, dtype=np.int64)
        self.skipped = np.zeros(capacity, dtype=bool)
        self.step_seconds = np.zeros(capacity, dtype=np.float64)
        self.phase_seconds = np.zeros((capacity, len(PHASES)), dtype=np.float64)
        self.sharpness = np.full(capacity, np.nan)  # top Hessian eigenvalue, when measured
        # (K, buckets) RMS ‖∂L/∂h_t‖ per time bucket (--model rnn); allocated by the first
        # step whose health carries it, so models without time steps pay nothing.
        self.time_grad_norm: np.ndarray | None = None

    FIELDS: tuple[str, ...] = (
        "step", "epoch", "loss", "samples", "lr", "grad_global_norm", "grad_norm",
        "update_ratio", "grad_max_abs", "nonfinite", "skipped", "step_seconds", "phase_seconds",
        "sharpness",
    )

    def __len__(self) -> int:
        return self.n

    def reset(self, capacity: int | None = None) -> None:
        """Rewind to 0 steps; reallocate only if `capacity` exceeds the current one."""
        if capacity is not None and capacity > self.capacity:
            self._alloc(capacity)
        self.n = 0

    def record(self, *, step: int, epoch: int, loss: float, samples: int, lr: float,
               health: Mapping, update_ratio: np.ndarray | None, skipped: bool,
               step_seconds: float, phase_seconds: Sequence[float]) -> None:
        """Write one step's row. `health` is a `grad_health` result; `update_ratio` (L,)
        (None → zeros, e.g. for a skipped step); `phase_seconds` in PHASES order."""
        k = self.n
        if k >= self.capacity:
            raise IndexError(f"StepStats is full ({self.capacity} steps); call reset()")
        self.step[k] = step
        self.epoch[k] = epoch
        self.loss[k] = loss
        self.samples[k] = samples
        self.lr[k] = lr
        self.grad_global_norm[k] = health["grad_global_norm"]
        self.grad_norm[k] = health["grad_norm"]
        self.grad_max_abs[k] = health["grad_max_abs"]
        self.nonfinite[k] = health["nonfinite"]
        if update_ratio is None:
            self.update_ratio[k] = 0.0
        else:
            self.update_ratio[k] = update_ratio
        self.skipped[k] = skipped
        self.step_seconds[k] = step_seconds
        self.phase_seconds[k] = phase_seconds
        self.sharpness[k] = np.nan
        time_norms = health.get("time_grad_norm")
        if time_norms is not None:
            if self.time_grad_norm is None:
                self.time_grad_norm = np.full((self.capacity, len(time_norms)), np.nan)
            self.time_grad_norm[k] = time_norms
        self.n = k + 1

    def as_dict(self, copy: bool = True) -> dict[str, np.ndarray]:
        """The first K rows of every array, by the names in the brief (copies by default,
        since the buffers are reused by the next chunk)."""
        k = self.n
        names = self.FIELDS + (("time_grad_norm",) if self.time_grad_norm is not None else ())
        return {name: (getattr(self, name)[:k].copy() if copy else getattr(self, name)[:k])
                for name in names}


def pack_rows(rows: dict[str, np.ndarray]) -> bytes:
    """`StepStats.as_dict()` rows as one bytes object (a layout, then every array's bytes
    back to back): what a Ray worker returns per chunk. Ray serialises a dict of ~15 small
    arrays in ~0.3 ms (~1 ms in a busy worker, holding the GIL the next chunk needs) and
    these bytes in a few µs."""
    import pickle
    layout = [(k, v.dtype.str, v.shape) for k, v in rows.items()]
    return pickle.dumps((layout, b"".join(np.ascontiguousarray(v).tobytes()
                                          for v in rows.values())), protocol=5)


def unpack_rows(packed: bytes) -> dict[str, np.ndarray]:
    """The rows `pack_rows` packed (writable copies)."""
    import pickle
    layout, blob = pickle.loads(packed)
    out, offset = {}, 0
    for k, dtype, shape in layout:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        out[k] = np.frombuffer(blob, dtype, offset=offset,
                               count=n // np.dtype(dtype).itemsize).reshape(shape).copy()
        offset += n
    return out


__all__ = [
    "PHASES", "StepStats", "classify", "grad_health", "health_from_sums", "layer_norms",
    "pack_rows", "unpack_rows", "update_ratios", "update_ratios_between",
]
