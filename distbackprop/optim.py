"""Optimizers, schedules, global-norm clipping, and `UpdateRule`, in place on flat arrays.

Every optimizer keeps its state as flat arrays in `state` (checkpointable as they are)
and updates `params` in place (`step_`) in ONE pass over memory: a fused numba kernel
(`distbackprop.kernels`) that also folds in the clipping scale, weight decay, the lr,
Adam's bias corrections and the per-layer sums ‖Δθ‖² and ‖θ‖² (update ratios). numba
is a dependency; there is no NumPy fallback: without numba, building an optimizer
raises ImportError saying so (rather than silently running a 3× slower update).

`UpdateRule` is what the runtime uses: optimizer + schedule + clipping, the "opt/<name>"
checkpoint layout of its state, and a contiguous shard [lo, hi) of the flat buffers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .threads import blas_env  # noqa: F401 - re-exported

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


def clip_scale(max_norm: float | None, norm: float) -> float:
    """The clipping factor min(1, max_norm/‖g‖) (as max_norm/(‖g‖ + 1e-12)); 1 if no clip
    or ‖g‖ is not finite (the caller skips such a step)."""
    if max_norm is not None and math.isfinite(norm) and norm > max_norm:
        return max_norm / (norm + 1e-12)
    return 1.0


def clip_grad_norm_(grads: np.ndarray, max_norm: float | None, norm: float | None = None) -> float:
    """Scale `grads` in place: g ← g · min(1, max_norm/‖g‖₂). Returns the pre-clip ‖g‖₂."""
    if norm is None:
        norm = math.sqrt(float(np.dot(grads, grads)))
    scale = clip_scale(max_norm, norm)
    if scale != 1.0:
        grads *= scale
    return norm


def _zeros_touched(n: int, dtype) -> np.ndarray:
    """Zeros whose pages are already mapped: np.zeros maps them lazily, which would put
    the page faults of the whole optimizer state into the first step."""
    a = np.empty(n, dtype)
    a.fill(0)
    return a


def _kernels():
    from . import kernels  # raises a clear ImportError if numba is missing
    return kernels


class Optimizer:
    """Base: `step_(params, grads, lr, scale)` updates `params` in place in one fused pass;
    `state` holds flat arrays.

    params, grads: (size,) C-contiguous arrays of `dtype`; `grads` is only read.
    Afterwards `update_sq[i]` = ‖Δθ‖² and `param_sq[i]` = ‖θ‖² (θ after the update) for
    segment i. Elements are dealt to threads in fixed blocks, and per-block sums are added
    in block order, so results are bit-identical whatever `threads` is.
    """

    name = "base"
    kernel = ""  # the name of its kernel in distbackprop.kernels

    def __init__(self, size: int, dtype=np.float32, momentum: float = 0.9,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, segments: list[slice] | None = None, threads: int = 1):
        k = _kernels()
        self._k = k
        self.size = size
        self.segments = list(segments) if segments else [slice(0, size)]
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype: {self.dtype} is not float32 or float64")
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.state: dict[str, np.ndarray] = {"t": np.zeros(1, dtype=np.int64)}
        self._starts, self._stops, self._segs, nseg = k.block_table(self.segments, size)
        self._blk = np.zeros((2, self._starts.size))
        self._out = np.zeros((2, nseg))  # last column: elements outside every segment
        nreal = len(self.segments)
        self.update_sq = self._out[0, :nreal]
        self.param_sq = self._out[1, :nreal]
        self.threads = max(1, int(threads))
        self._fn = k.kernel(self.kernel, self.threads)
        # Compile, or load from numba's cache, now: never inside a timed step (with the
        # gradient-health kernels, which every step runs too).
        k.warm((self.dtype,), (self.kernel, "health"), (self.threads,))

    @property
    def t(self) -> int:
        return int(self.state["t"][0])

    def state_bytes(self) -> int:
        return sum(v.nbytes for v in self.state.values())

    def load_state_(self, state: dict[str, np.ndarray]) -> None:
        """Copy saved state arrays into this optimizer's (shapes must match)."""
        for k, v in self.state.items():
            if k not in state or state[k].shape != v.shape:
                raise ValueError(f"optimizer state {k!r} missing or of the wrong shape")
            v[...] = state[k]

    def _check(self, a: np.ndarray, what: str) -> None:
        # A different dtype or layout would make numba compile a new specialisation in the step.
        if a.dtype != self.dtype or a.shape != (self.size,) or not a.flags.c_contiguous:
            raise ValueError(f"{what}: need a C-contiguous ({self.size},) {self.dtype} array, "
                             f"got {a.shape} {a.dtype}")

    def step_(self, params: np.ndarray, grads: np.ndarray, lr: float, scale: float = 1.0) -> None:
        """One update of `params` in place with gradient scale·g (`grads` is only read)."""
        self._check(params, "params")
        self._check(grads, "grads")
        self.state["t"][0] += 1
        t = self.dtype.type
        if self.threads == 1:  # the serial kernel, on this thread
            self._kernel_(params, grads, t(lr), t(scale), lr)
            return
        with self._k.LAUNCH_LOCK:
            self._k.set_threads(self.threads)
            self._kernel_(params, grads, t(lr), t(scale), lr)

    def nonfinite_update(self) -> bool:
        """True if the last step's Δθ or θ had a NaN/±inf (from the sums: no extra pass)."""
        return not bool(np.isfinite(self._out).all())

    def close(self) -> None:
        """Nothing to release (kept for callers of the earlier thread-pool version)."""

    def update_ratios(self) -> np.ndarray:
        """‖Δθ‖/‖θ‖ per segment for the last step (0 where ‖θ‖ = 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt(self.update_sq) / np.sqrt(self.param_sq)
        return np.nan_to_num(r, nan=0.0, posinf=0.0)

    def _kernel_(self, p, g, lr_t, scale_t, lr: float) -> None:  # pragma: no cover
        raise NotImplementedError


class SGD(Optimizer):
    """θ ← θ − lr (g + λθ)."""

    name = "sgd"
    kernel = "sgd"

    def _kernel_(self, p, g, lr_t, scale_t, lr):
        t = self.dtype.type
        self._fn(p, g, self._starts, self._stops, self._segs, self._blk, self._out,
                 t(0.0), scale_t, lr_t, t(lr * self.weight_decay))


class Momentum(Optimizer):
    """v ← μv + (g + λθ); θ ← θ − lr·v (heavy ball, PyTorch's form)."""

    name = "momentum"
    kernel = "momentum"
    nesterov = False

    def __init__(self, size, dtype=np.float32, **kw):
        super().__init__(size, dtype, **kw)
        self.state["velocity"] = _zeros_touched(size, self.dtype)

    def _kernel_(self, p, g, lr_t, scale_t, lr):
        t = self.dtype.type
        self._fn(p, g, self.state["velocity"], self._starts, self._stops, self._segs,
                 self._blk, self._out, t(0.0), scale_t, lr_t, t(self.momentum),
                 t(self.weight_decay), self.nesterov)


class Nesterov(Momentum):
    """v ← μv + g'; θ ← θ − lr (g' + μv), g' = g + λθ (Sutskever/PyTorch Nesterov)."""

    name = "nesterov"
    nesterov = True


class Adam(Optimizer):
    """m ← β₁m + (1−β₁)g'; v ← β₂v + (1−β₂)g'²; θ ← θ − lr · m̂ / (√v̂ + ε).

    m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ); g' = g + λθ (L2 weight decay, as in Adam). Computed as
    θ ← θ − (lr·c₂/c₁) · m / (√v + ε·c₂), c₁ = 1−β₁ᵗ, c₂ = √(1−β₂ᵗ) (the same quantity).
    """

    name = "adam"
    kernel = "adam"
    decoupled = False

    def __init__(self, size, dtype=np.float32, **kw):
        super().__init__(size, dtype, **kw)
        self.state["m"] = _zeros_touched(size, self.dtype)
        self.state["v"] = _zeros_touched(size, self.dtype)

    def _kernel_(self, p, g, lr_t, scale_t, lr):
        b1, b2 = self.betas
        c1 = 1.0 - b1**self.t
        c2 = math.sqrt(1.0 - b2**self.t)
        t = self.dtype.type
        self._fn(p, g, self.state["m"], self.state["v"], self._starts, self._stops,
                 self._segs, self._blk, self._out, t(0.0), scale_t, t(b1), t(b2),
                 t(1.0 - b1), t(1.0 - b2), t(self.weight_decay), t(self.eps * c2),
                 t(lr * c2 / c1), t(lr * self.weight_decay), self.decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): θ ← θ(1 − lr·λ), then Adam on g."""

    name = "adamw"
    decoupled = True


_CLASSES: dict[str, type[Optimizer]] = {c.name: c for c in (SGD, Momentum, Nesterov, Adam, AdamW)}


def make_optimizer(name: str, size: int, dtype=np.float32, **kw: Any) -> Optimizer:
    """Optimizer by name; kwargs: momentum, weight_decay, betas, eps, segments, threads."""
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}") from None
    return cls(size, dtype, **kw)


class Schedule:
    """lr(step) for step = 0, 1, …: linear warmup over `warmup` steps, then

    constant: base · cosine: base · ½(1 + cos(π·s/S)) over S = total − warmup steps ·
    step: base · γ^⌊s/step_size⌋, with s counted after warmup.
    """

    def __init__(self, kind: str, base_lr: float, total_steps: int, warmup: int = 0,
                 step_size: int = 1000, gamma: float = 0.1):
        if kind not in ("constant", "cosine", "step"):
            raise ValueError(f"lr_schedule: {kind!r} is not one of constant, cosine, step")
        self.kind, self.base, self.total, self.warmup = kind, base_lr, max(total_steps, 1), warmup
        self.step_size, self.gamma = step_size, gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        s = step - self.warmup
        if self.kind == "constant":
            return self.base
        if self.kind == "cosine":
            span = max(self.total - self.warmup, 1)
            return self.base * 0.5 * (1.0 + math.cos(math.pi * min(s, span) / span))
        return self.base * self.gamma ** (s // self.step_size)


def _shard_segments(segments: list[slice], lo: int, hi: int) -> tuple[list[int], list[slice]]:
    """Segments clipped to the shard [lo, hi): (their indexes, their slices relative to lo)."""
    idx, local = [], []
    for i, seg in enumerate(segments):
        a, b = max(seg.start, lo), min(seg.stop, hi)
        if a < b:
            idx.append(i)
            local.append(slice(a - lo, b - lo))
    return idx, local


class UpdateRule:
    """optimizer + lr schedule + global-norm clipping + weight decay, and the one definition of the
    checkpoint layout of its state ("opt/<name>" keys).

    The rule owns the contiguous shard [lo, hi) of the flat buffers (all of them by default);
    its state arrays have hi − lo elements. `update_sq[i]` and `param_sq[i]` are this shard's
    share of ‖Δθ‖² and ‖θ‖² over segment i (0 for segments outside the shard), so a sharded
    caller SUM-allreduces them and calls `UpdateRule.ratios`.
    """

    STATE_PREFIX = "opt/"

    def __init__(self, optimizer: str, n_params: int, dtype, segments: list[slice],
                 schedule: Schedule, clip_norm: float | None = None, momentum: float = 0.9,
                 weight_decay: float = 0.0, threads: int = 1,
                 shard: tuple[int, int] | None = None):
        lo, hi = (0, n_params) if shard is None else (int(shard[0]), int(shard[1]))
        if not 0 <= lo <= hi <= n_params:
            raise ValueError(f"shard: [{lo}, {hi}) is not inside [0, {n_params})")
        self.n_params, self.shard, self.size = n_params, (lo, hi), hi - lo
        self.dtype = np.dtype(dtype)
        self.segments = list(segments) if segments else [slice(0, n_params)]
        self.schedule, self.clip_norm = schedule, clip_norm
        self._seg_idx, local = _shard_segments(self.segments, lo, hi)
        # Segments outside the shard contribute nothing; shard elements in no segment are
        # still updated (the kernel's extra slot).
        self.optimizer = make_optimizer(optimizer, self.size, self.dtype, momentum=momentum,
                                        weight_decay=weight_decay, segments=local,
                                        threads=threads)
        self.threads = self.optimizer.threads
        from .kernels import set_threads
        set_threads(self.threads)  # numba's count is per calling thread; step_ sets it again
        self.update_sq = np.zeros(len(self.segments))
        self.param_sq = np.zeros(len(self.segments))

    @classmethod
    def from_config(cls, config: Any, n_params: int, dtype, segments: list[slice],
                    total_steps: int, shard: tuple[int, int] | None = None) -> UpdateRule:
        """The rule of a training config (attributes optimizer, lr, momentum, weight_decay,
        clip_norm, lr_schedule, warmup_steps, lr_step_size, lr_gamma, cpus_per_worker)."""
        schedule = Schedule(config.lr_schedule, config.lr, total_steps, config.warmup_steps,
                            config.lr_step_size, config.lr_gamma)
        return cls(config.optimizer, n_params, dtype, segments, schedule,
                   clip_norm=config.clip_norm, momentum=config.momentum,
                   weight_decay=config.weight_decay, threads=config.cpus_per_worker,
                   shard=shard)

    def lr(self, step: int) -> float:
        """The learning rate of global step `step` (0-based)."""
        return self.schedule(step)

    def _local(self, a: np.ndarray, what: str) -> np.ndarray:
        """The shard of a flat buffer: the full buffer (n_params) or the shard itself."""
        lo, hi = self.shard
        if a.shape == (self.n_params,):
            return a[lo:hi]
        if a.shape == (self.size,):
            return a
        raise ValueError(f"{what}: shape {a.shape}, expected ({self.n_params},) or ({self.size},)")

    def step_(self, params: np.ndarray, grads: np.ndarray, step: int, gnorm: float) -> float:
        """One update in place: θ ← optimizer(θ, s·g, lr(step)), s = min(1, clip_norm/gnorm).

        `params`, `grads`: shape (n_params,) (the shard [lo, hi) is used) or (hi − lo,),
        C-contiguous, of the rule's dtype; `gnorm` is the global ‖g‖₂ already computed by
        the caller. The clip is a scale inside the fused pass: `grads` is only read, never
        modified. Returns lr. A caller that skips a non-finite step simply does not call this.
        """
        lr = self.lr(step)
        self.optimizer.step_(self._local(params, "params"), self._local(grads, "grads"), lr,
                             clip_scale(self.clip_norm, gnorm))
        self.update_sq[self._seg_idx] = self.optimizer.update_sq[: len(self._seg_idx)]
        self.param_sq[self._seg_idx] = self.optimizer.param_sq[: len(self._seg_idx)]
        return lr

    def nonfinite_update(self) -> bool:
        """True if the last step produced a NaN/±inf in Δθ or θ (from the fused sums, free)."""
        return self.optimizer.nonfinite_update()

    @staticmethod
    def ratios(update_sq: np.ndarray, param_sq: np.ndarray) -> np.ndarray:
        """‖Δθ‖/‖θ‖ per segment from (allreduced) sums of squares; 0 where ‖θ‖ = 0."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt(update_sq) / np.sqrt(param_sq)
        return np.nan_to_num(r, nan=0.0, posinf=0.0)

    def update_ratios(self) -> np.ndarray:
        """Per segment ‖Δθ‖/‖θ‖ of the last `step_` (this shard's share only, if sharded)."""
        return self.ratios(self.update_sq, self.param_sq)

    def state_views(self) -> dict[str, np.ndarray]:
        """{"opt/<name>": array}: the live state arrays, no copy (for zero-copy commits)."""
        return {self.STATE_PREFIX + k: v for k, v in self.optimizer.state.items()}

    def state(self) -> dict[str, np.ndarray]:
        """{"opt/<name>": copy}: what a commit or checkpoint stores."""
        return {k: v.copy() for k, v in self.state_views().items()}

    def load_state_(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy the "opt/<name>" arrays of `state` (other keys are ignored) into this rule's.
        A missing key or a wrong shape raises ValueError naming the key."""
        views = self.state_views()
        for k, v in views.items():
            if k not in state:
                raise ValueError(f"optimizer state {k!r} missing")
            if np.shape(state[k]) != v.shape:
                raise ValueError(f"optimizer state {k!r}: shape {np.shape(state[k])}, "
                                 f"expected {v.shape}")
        for k, v in views.items():
            v[...] = state[k]

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()

    def close(self) -> None:
        self.optimizer.close()
