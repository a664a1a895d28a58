"""Optimizers, schedules and global-norm clipping, in place on flat arrays.

Every optimizer keeps its state as flat arrays in `state` (checkpointable as
they are) and updates `params` in place (`step_`). The update runs over
blocks of the flat buffer, dealt to `threads` threads (NumPy releases the GIL
inside ufuncs), and each block also yields its share of ‖Δθ‖² and ‖θ‖² per
layer, so update ratios cost no extra sweep.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
_BLOCK = 1 << 19  # elements per block; measured fastest here among 2^15..2^19 (1 and 2 threads)


def clip_grad_norm_(grads: np.ndarray, max_norm: float | None, norm: float | None = None) -> float:
    """Scale `grads` in place: g ← g · min(1, max_norm/‖g‖₂). Returns the pre-clip ‖g‖₂."""
    if norm is None:
        norm = math.sqrt(float(np.dot(grads, grads)))
    if max_norm is not None and math.isfinite(norm) and norm > max_norm:
        grads *= max_norm / (norm + 1e-12)
    return norm


class Optimizer:
    """Base: `step_(params, grads, lr)` updates `params` in place; `state` holds flat arrays."""

    name = "base"

    def __init__(self, size: int, dtype=np.float32, momentum: float = 0.9,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, segments: list[slice] | None = None, threads: int = 1):
        self.size = size
        # Per-segment (per-layer) ‖Δθ‖² and ‖θ‖², accumulated block by block while
        # the block is in cache: the update ratio costs no extra pass over memory.
        self.segments = list(segments) if segments else [slice(0, size)]
        self.update_sq = np.zeros(len(self.segments))
        self.param_sq = np.zeros(len(self.segments))
        self.dtype = np.dtype(dtype)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.state: dict[str, np.ndarray] = {"t": np.zeros(1, dtype=np.int64)}
        # Blocks never straddle a segment, so per-segment sums stay exact; they are
        # dealt round-robin to `threads` threads (NumPy releases the GIL in ufuncs),
        # each with its own scratch. The arithmetic per element is the same whatever
        # the thread count, so results do not depend on it.
        self._blocks = [(i, lo, min(lo + _BLOCK, seg.stop))
                        for i, seg in enumerate(self.segments)
                        for lo in range(seg.start, seg.stop, _BLOCK)]
        self.threads = max(1, min(int(threads), len(self._blocks) or 1))
        n = min(size, _BLOCK) or 1
        self._scratch = [(np.empty(n, self.dtype), np.empty(n, self.dtype))
                         for _ in range(self.threads)]
        self._pool = None
        self._usq = np.zeros((self.threads, len(self.segments)))
        self._psq = np.zeros((self.threads, len(self.segments)))

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

    def step_(self, params: np.ndarray, grads: np.ndarray, lr: float) -> None:
        """One update of `params` in place (`grads` is only read).

        Afterwards `update_sq[i]` = ‖Δθ‖² and `param_sq[i]` = ‖θ‖² (after the
        update) for segment i, so ‖Δθ‖/‖θ‖ per layer is free.
        """
        self.state["t"][0] += 1
        self._prepare_step()
        self._usq.fill(0.0)
        self._psq.fill(0.0)
        if self.threads == 1:
            self._run_blocks(0, params, grads, lr)
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(self.threads - 1,
                                                thread_name_prefix="distbackprop-optim")
            futures = [self._pool.submit(self._run_blocks, t, params, grads, lr)
                       for t in range(1, self.threads)]
            self._run_blocks(0, params, grads, lr)
            for f in futures:
                f.result()
        np.sum(self._usq, axis=0, out=self.update_sq)
        np.sum(self._psq, axis=0, out=self.param_sq)

    def _run_blocks(self, t: int, params: np.ndarray, grads: np.ndarray, lr: float) -> None:
        tmp_full, tmp2_full = self._scratch[t]
        usq, psq = self._usq[t], self._psq[t]
        for i, lo, hi in self._blocks[t::self.threads]:
            p, tmp, tmp2 = params[lo:hi], tmp_full[: hi - lo], tmp2_full[: hi - lo]
            self._block_(p, grads[lo:hi], lr, lo, hi, tmp, tmp2)  # leaves −Δθ in tmp
            usq[i] += float(np.dot(tmp, tmp))
            psq[i] += float(np.dot(p, p))

    def _prepare_step(self) -> None:
        """Per-step scalars (e.g. Adam's bias corrections), before the blocks run."""

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def update_ratios(self) -> np.ndarray:
        """‖Δθ‖/‖θ‖ per segment for the last step (0 where ‖θ‖ = 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt(self.update_sq) / np.sqrt(self.param_sq)
        return np.nan_to_num(r, nan=0.0, posinf=0.0)

    def _block_(self, p, g, lr, lo, hi, tmp, tmp2) -> None:  # pragma: no cover - interface
        """Update block p in place and leave the subtracted amount (−Δθ) in tmp."""
        raise NotImplementedError


class SGD(Optimizer):
    """θ ← θ − lr (g + λθ)."""

    name = "sgd"

    def _block_(self, p, g, lr, lo, hi, tmp, tmp2):
        np.multiply(g, lr, out=tmp)
        if self.weight_decay:
            tmp += (lr * self.weight_decay) * p
        p -= tmp


class Momentum(Optimizer):
    """v ← μv + (g + λθ); θ ← θ − lr·v (heavy ball, PyTorch's form)."""

    name = "momentum"

    def __init__(self, size, dtype=np.float32, **kw):
        super().__init__(size, dtype, **kw)
        self.state["velocity"] = np.zeros(size, dtype=self.dtype)

    def _g(self, p, g, tmp):
        if self.weight_decay:
            np.multiply(p, self.weight_decay, out=tmp)
            tmp += g
            return tmp
        return g

    def _block_(self, p, g, lr, lo, hi, tmp, tmp2):
        v = self.state["velocity"][lo:hi]
        v *= self.momentum
        v += self._g(p, g, tmp)
        np.multiply(v, lr, out=tmp)
        p -= tmp


class Nesterov(Momentum):
    """v ← μv + g'; θ ← θ − lr (g' + μv), g' = g + λθ (Sutskever/PyTorch Nesterov)."""

    name = "nesterov"

    def _block_(self, p, g, lr, lo, hi, tmp, tmp2):
        v = self.state["velocity"][lo:hi]
        gg = self._g(p, g, tmp)
        v *= self.momentum
        v += gg
        # tmp may alias gg: tmp ← lr (gg + μ v)
        np.add(gg, self.momentum * v, out=tmp)
        tmp *= lr
        p -= tmp


class Adam(Optimizer):
    """m ← β₁m + (1−β₁)g'; v ← β₂v + (1−β₂)g'²; θ ← θ − lr · m̂ / (√v̂ + ε).

    m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ); g' = g + λθ (L2 weight decay, as in Adam).
    """

    name = "adam"
    decoupled = False

    def __init__(self, size, dtype=np.float32, **kw):
        super().__init__(size, dtype, **kw)
        self.state["m"] = np.zeros(size, dtype=self.dtype)
        self.state["v"] = np.zeros(size, dtype=self.dtype)

    def _prepare_step(self):
        t = self.t
        b1, b2 = self.betas
        self._c1 = 1.0 - b1**t
        self._c2 = math.sqrt(1.0 - b2**t)

    def _block_(self, p, g, lr, lo, hi, tmp, tmp2):
        b1, b2 = self.betas
        m = self.state["m"][lo:hi]
        v = self.state["v"][lo:hi]
        t2 = tmp2
        if self.weight_decay and self.decoupled:
            # AdamW: θ ← θ − lr·λ·θ outside the moments; folded into tmp below so that
            # tmp holds the whole step (decay uses θ before this step's Adam term).
            np.multiply(p, lr * self.weight_decay, out=t2)
        elif self.weight_decay:
            np.multiply(p, self.weight_decay, out=t2)
            t2 += g
            g = t2
        m *= b1
        np.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        np.multiply(g, g, out=tmp)
        v *= b2
        tmp *= 1.0 - b2
        v += tmp
        # lr·m̂/(√v̂+ε) = (lr·c2/c1) · m / (√v + ε·c2), c1 = 1−β₁ᵗ, c2 = √(1−β₂ᵗ): one pass fewer
        np.sqrt(v, out=tmp)
        tmp += self.eps * self._c2
        np.divide(m, tmp, out=tmp)
        tmp *= lr * self._c2 / self._c1
        if self.weight_decay and self.decoupled:
            tmp += t2
        p -= tmp


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): θ ← θ(1 − lr·λ), then Adam on g."""

    name = "adamw"
    decoupled = True


_CLASSES: dict[str, type[Optimizer]] = {c.name: c for c in (SGD, Momentum, Nesterov, Adam, AdamW)}


def make_optimizer(name: str, size: int, dtype=np.float32, **kw: Any) -> Optimizer:
    """Optimizer by name; kwargs: momentum, weight_decay, betas, eps."""
    try:
        return _CLASSES[name](size, dtype, **kw)
    except KeyError:
        raise ValueError(f"optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}") from None


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
        self.optimizer = make_optimizer(optimizer, self.size, self.dtype, momentum=momentum,
                                        weight_decay=weight_decay,
                                        segments=local or [slice(0, self.size)], threads=threads)
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
        """One update in place: g ← g·min(1, clip_norm/gnorm), θ ← optimizer(θ, g, lr(step)).

        `params`, `grads`: shape (n_params,) (the shard [lo, hi) is used) or (hi − lo,);
        `gnorm` is the global ‖g‖₂ already computed by the caller. `grads` is scaled in place
        when clipped. Returns lr.
        """
        lr = self.lr(step)
        g = self._local(grads, "grads")
        clip_grad_norm_(g, self.clip_norm, norm=gnorm)
        self.optimizer.step_(self._local(params, "params"), g, lr)
        self.update_sq.fill(0.0)
        self.param_sq.fill(0.0)
        self.update_sq[self._seg_idx] = self.optimizer.update_sq[: len(self._seg_idx)]
        self.param_sq[self._seg_idx] = self.optimizer.param_sq[: len(self._seg_idx)]
        return lr

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
