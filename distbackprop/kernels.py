"""Fused update kernels (numba): each optimizer is one pass over the flat buffers.

A pass reads θ, g and the optimizer's state once, writes θ and the state once, and
on the way folds in the clipping scale, weight decay, the lr, Adam's bias corrections,
and the per-segment sums ‖Δθ‖² and ‖θ‖² (update ratios, and a non-finite check of
Δθ for free). The loop runs over a fixed table of blocks (`block_table`): blocks never
straddle a segment and do not depend on the thread count, each block's sums are
written to its own slot, and the slots are added up serially in block order. So the
arithmetic of every element and every sum is the same whatever the number of threads:
replicas with different `--cpus-per-worker` stay bit-identical.

Arguments shared by every kernel: p, g (n,) parameters and gradient, dtype float32 or
float64; `starts`, `stops`, `segs` (nblocks,) int64, the block table; `blk` (2, nblocks)
float64 scratch; `out` (2, nseg) float64 receives Σ Δθ² and Σ θ² (θ after the step) per
segment; `zero` is 0 in the array dtype. Scalars are passed already cast to the array
dtype, so float32 arithmetic stays float32 (as NumPy does with Python scalars). Within a
block the sums accumulate in the array dtype: float64 accumulation kept float32 loops at 4
lanes (the widening) and cost 2.6 vs 2.2 ms CPU per reference Adam step; a float32 sum
of ≤ 16 Ki squares is good to ~1e-6 relative, plenty for a diagnostic ratio (blocks are
then added in float64). A |Δθ| above ~1e19 overflows its square to inf in float32: reported
as non-finite, which such an update is in all but name.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError as exc:  # a dependency: missing means a broken install, not a slow path
    raise ImportError("distbackprop's update kernels need numba (pip install 'numba>=0.60'); "
                      "it is a dependency of distbackprop, so the install is incomplete") from exc

BLOCK = 1 << 14  # elements per block (64 KiB of float32): a block's arrays stay in L2
# LLVM fast-math flags, chosen by measurement (reference Adam, 1.86 M float32, one thread,
# CPU time, medians of 60-200 interleaved calls). Only the Σ Δθ² and Σ θ² accumulations
# (`_sq_acc`) get `reassoc`: it lets LLVM vectorise those reductions, and with them the whole
# loop (9.2 → 2.8 ms); without it the loop stays scalar. The elementwise update has NO
# fast-math flag: `contract` (FMA) measured 2.45 vs 2.49 ms (noise), `nsz`, `arcp`, `afn`
# changed nothing measurable (2.59, 2.56 vs 2.61 ms), and strict IEEE
# arithmetic makes θ and the state bit-identical to the NumPy update and the same on every
# CPU (with FMA, a replica on a CPU without it, or a different instruction choice, could
# round differently). Never `nnan`/`ninf`: NaN and ±inf must reach θ and the sums.
FASTMATH = frozenset({"reassoc"})  # on the reductions only
# numba's "workqueue" threads block on a condition variable between kernels; libgomp's (the
# "omp" layer numba picks when libgomp is installed) spin after each kernel, and in the
# reference step that slowed the GEMM that followed the update from ~16 to ~25 ms. workqueue
# also needs no system library, so the image and a dev machine run the same layer. It is not
# safe for launches from two threads at once: `LAUNCH_LOCK` serialises them.
# NUMBA_THREADING_LAYER in the environment still wins.
THREADING_LAYER = "workqueue"
if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = THREADING_LAYER
LAUNCH_LOCK = threading.Lock()


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _ensure_cache_dir() -> str | None:
    """Make sure numba has a writable cache directory before the kernels are defined.

    numba tries $NUMBA_CACHE_DIR, then __pycache__ beside this file, then its user-wide
    cache (~/.cache/numba); with none writable, `cache=True` raises at decoration. In
    that case (read-only install and home, e.g. an image run under another uid) use a
    per-user directory under the temp dir. Returns the directory set, or None if one of
    numba's own choices works.
    """
    from numba.misc.appdirs import AppDirs
    candidates = [numba.config.CACHE_DIR,
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__"),
                  AppDirs(appname="numba", appauthor=False).user_cache_dir]
    if any(c and _writable(c) for c in candidates):
        return None
    path = os.path.join(tempfile.gettempdir(), f"distbackprop-numba-{os.getuid()}")
    if not _writable(path):
        return None  # nowhere to cache: numba will say so at the first kernel
    numba.config.CACHE_DIR = path
    return path


CACHE_DIR_FALLBACK = _ensure_cache_dir()

# error_model="numpy": x/0 gives inf/NaN instead of raising ZeroDivisionError; the check
# that raising needs is a branch per element that stops LLVM from vectorising the loop.
_OPTS = dict(error_model="numpy", cache=True, nogil=True)


def block_table(segments: list[slice], n: int, block: int = BLOCK
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Blocks of at most `block` elements covering [0, n), none straddling a segment.

    Returns (starts, stops, segs, nseg): `segs[b]` is the segment index of block b, or
    len(segments) for elements in no segment (they are updated too, summed into that
    extra slot), and nseg = len(segments) + 1. Segments must be disjoint, inside [0, n).
    """
    spans = sorted((s.start, s.stop, i) for i, s in enumerate(segments) if s.stop > s.start)
    pieces, pos = [], 0
    for a, b, i in spans:
        if a < pos or b > n or a < 0:
            raise ValueError(f"segments must be disjoint slices inside [0, {n}): "
                             f"segment {i} is [{a}, {b})")
        if a > pos:
            pieces.append((pos, a, len(segments)))
        pieces.append((a, b, i))
        pos = b
    if pos < n:
        pieces.append((pos, n, len(segments)))
    starts, stops, segs = [], [], []
    for a, b, i in pieces:
        for lo in range(a, b, block):
            starts.append(lo)
            stops.append(min(lo + block, b))
            segs.append(i)
    return (np.array(starts, np.int64), np.array(stops, np.int64), np.array(segs, np.int64),
            len(segments) + 1)


@njit(fastmath=set(FASTMATH), **_OPTS)
def _sq_acc(acc, x):
    # acc + x²; `reassoc` (on these two instructions only, once inlined) lets the
    # accumulation be split across vector lanes: a fixed order for a given block.
    return acc + x * x


@njit(**_OPTS)
def _sum_blocks(segs, blk, out):
    # serial, in block order: the sums do not depend on how blocks were dealt to threads
    out[:] = 0.0
    for b in range(segs.size):
        out[0, segs[b]] += blk[0, b]
        out[1, segs[b]] += blk[1, b]


# Block bodies loop over `range(x.size)` of slices: with an index known to be non-negative
# numba drops its negative-index wraparound branch, which would keep the loop scalar.
@njit(**_OPTS)
def _sgd_block(p, g, zero, scale, lr, lr_wd):
    du = zero
    dp = zero
    for i in range(p.size):
        pi = p[i]
        d = (g[i] * scale) * lr + lr_wd * pi
        pn = pi - d
        p[i] = pn
        du = _sq_acc(du, d)
        dp = _sq_acc(dp, pn)
    return du, dp


@njit(parallel=True, **_OPTS)
def sgd_(p, g, starts, stops, segs, blk, out, zero, scale, lr, lr_wd):
    """θ ← θ − (lr·(s·g) + (lr·λ)·θ)."""
    for b in prange(starts.size):
        lo, hi = starts[b], stops[b]
        du, dp = _sgd_block(p[lo:hi], g[lo:hi], zero, scale, lr, lr_wd)
        blk[0, b] = du
        blk[1, b] = dp
    _sum_blocks(segs, blk, out)


@njit(**_OPTS)
def sgd_serial_(p, g, starts, stops, segs, blk, out, zero, scale, lr, lr_wd):
    """`sgd_` on the calling thread (see SERIAL)."""
    for b in range(starts.size):
        lo, hi = starts[b], stops[b]
        blk[0, b], blk[1, b] = _sgd_block(p[lo:hi], g[lo:hi], zero, scale, lr, lr_wd)
    _sum_blocks(segs, blk, out)


@njit(**_OPTS)
def _momentum_block(p, g, vel, zero, scale, lr, mu, wd, nesterov):
    du = zero
    dp = zero
    for i in range(p.size):
        pi = p[i]
        gi = pi * wd + g[i] * scale
        vi = vel[i] * mu + gi
        vel[i] = vi
        if nesterov:
            d = (gi + mu * vi) * lr
        else:
            d = vi * lr
        pn = pi - d
        p[i] = pn
        du = _sq_acc(du, d)
        dp = _sq_acc(dp, pn)
    return du, dp


@njit(parallel=True, **_OPTS)
def momentum_(p, g, vel, starts, stops, segs, blk, out, zero, scale, lr, mu, wd, nesterov):
    """g' = s·g + λθ; v ← μv + g'; θ ← θ − lr·v (heavy ball) or θ − lr·(g' + μv) (Nesterov)."""
    for b in prange(starts.size):
        lo, hi = starts[b], stops[b]
        du, dp = _momentum_block(p[lo:hi], g[lo:hi], vel[lo:hi], zero, scale, lr, mu, wd,
                                 nesterov)
        blk[0, b] = du
        blk[1, b] = dp
    _sum_blocks(segs, blk, out)


@njit(**_OPTS)
def momentum_serial_(p, g, vel, starts, stops, segs, blk, out, zero, scale, lr, mu, wd,
                     nesterov):
    """`momentum_` on the calling thread (see SERIAL)."""
    for b in range(starts.size):
        lo, hi = starts[b], stops[b]
        blk[0, b], blk[1, b] = _momentum_block(p[lo:hi], g[lo:hi], vel[lo:hi], zero, scale,
                                               lr, mu, wd, nesterov)
    _sum_blocks(segs, blk, out)


@njit(**_OPTS)
def _adam_block(p, g, m, v, zero, scale, b1, b2, omb1, omb2, wd, eps_c2, step_size, lr_wd,
                decoupled):
    du = zero
    dp = zero
    for i in range(p.size):
        pi = p[i]
        gi = g[i] * scale
        if not decoupled:
            gi = pi * wd + gi
        mi = m[i] * b1 + gi * omb1
        vi = v[i] * b2 + (gi * gi) * omb2
        m[i] = mi
        v[i] = vi
        d = (mi / (np.sqrt(vi) + eps_c2)) * step_size
        if decoupled:
            d = d + pi * lr_wd
        pn = pi - d
        p[i] = pn
        du = _sq_acc(du, d)
        dp = _sq_acc(dp, pn)
    return du, dp


@njit(parallel=True, **_OPTS)
def adam_(p, g, m, v, starts, stops, segs, blk, out, zero, scale, b1, b2, omb1, omb2, wd,
          eps_c2, step_size, lr_wd, decoupled):
    """g' = s·g (+ λθ unless decoupled); m ← β₁m + (1−β₁)g'; v ← β₂v + (1−β₂)g'²;
    θ ← θ − (k·m/(√v + ε·c₂) (+ lr·λ·θ if decoupled)), k = lr·c₂/c₁, c₁ = 1−β₁ᵗ, c₂ = √(1−β₂ᵗ)."""
    for b in prange(starts.size):
        lo, hi = starts[b], stops[b]
        du, dp = _adam_block(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], zero, scale, b1, b2,
                             omb1, omb2, wd, eps_c2, step_size, lr_wd, decoupled)
        blk[0, b] = du
        blk[1, b] = dp
    _sum_blocks(segs, blk, out)


@njit(**_OPTS)
def adam_serial_(p, g, m, v, starts, stops, segs, blk, out, zero, scale, b1, b2, omb1, omb2,
                 wd, eps_c2, step_size, lr_wd, decoupled):
    """`adam_` on the calling thread (see SERIAL)."""
    for b in range(starts.size):
        lo, hi = starts[b], stops[b]
        blk[0, b], blk[1, b] = _adam_block(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], zero,
                                           scale, b1, b2, omb1, omb2, wd, eps_c2, step_size,
                                           lr_wd, decoupled)
    _sum_blocks(segs, blk, out)


# Gradient health in one pass (`metrics.health.grad_health`, and the sharded sum over the
# ranks' gradients): per segment Σ x² accumulated in float64 (each float32 square is exact in
# float64; `reassoc` on the accumulation only, as above), and max |x| as the largest of the
# entries' bit patterns with the sign bit masked off (`xb` is x viewed as int32/int64, `mask`
# 0x7FF…F of that width). For IEEE floats that integer order is the order of |x| over finite
# values and inf, so the maximum is an integer reduction, which vectorises (a float max must
# keep NaN semantics and stays scalar). NaN patterns sort above inf: callers use the result
# only when every Σ x² is finite, which proves every entry finite.
@njit(**_OPTS)
def _health_block(x, xb, mask, acc, m):
    for i in range(x.size):
        acc = _sq_acc(acc, np.float64(x[i]))
        m = max(m, xb[i] & mask)
    return acc, m


@njit(**_OPTS)
def health_(x, xb, starts, stops, sq, mask):
    """sq[l] ← Σ_{i∈[starts[l], stops[l])} x_i² (float64); returns max_i (xb_i & mask)."""
    m = mask & 0
    for seg in range(starts.size):
        lo, hi = starts[seg], stops[seg]
        sq[seg], m = _health_block(x[lo:hi], xb[lo:hi], mask, 0.0, m)
    return m


@njit(**_OPTS)
def sum_health_(parts, lo, out, ob, starts, stops, sq, mask, scratch):
    """out ← parts[0][lo:lo+n] + parts[1][lo:lo+n] + … (added in that order, like NumPy's
    chain of adds), then `health_` of out over segments [starts, stops) of out, which must
    tile out (n,). Works through L2-sized blocks, so the health pass re-reads out from cache.
    `parts`: a tuple of ≥ 2 flat (P,) arrays; `ob` is out viewed as int. out may be one of
    the parts' own [lo, lo+n) (the sum in place): with more than 2 parts each block is
    summed in `scratch` (≥ BLOCK elements) first, as a later part may be the one out is."""
    m = mask & 0
    for seg in range(starts.size):
        acc = 0.0
        for a in range(starts[seg], stops[seg], BLOCK):
            b = min(a + BLOCK, stops[seg])
            o = out[a:b] if len(parts) == 2 else scratch[:b - a]
            x0 = parts[0][lo + a:lo + b]
            x1 = parts[1][lo + a:lo + b]
            for i in range(o.size):
                o[i] = x0[i] + x1[i]
            for k in range(2, len(parts)):
                xk = parts[k][lo + a:lo + b]
                for i in range(o.size):
                    o[i] = o[i] + xk[i]
            if len(parts) > 2:
                out[a:b] = o
            acc, m = _health_block(out[a:b], ob[a:b], mask, acc, m)
        sq[seg] = acc
    return m


# One thread: the `*_serial_` twins run the same blocks in the same order on the caller's
# thread. A `parallel=True` kernel hands even a one-thread launch to numba's pool thread and
# waits for it (measured, one Ray worker: the step's thread blocked 6% of the time, ~70
# hand-overs/s). With one worker per core that thread has no core of its own: with 2 Ray
# workers on 2 cores it woke ~150 times/s, often on the other worker's core.
# The twins are separate functions, not the prange kernels compiled again with
# parallel=False: numba's on-disk cache keys an entry by function and signature, not by
# flags, so one function compiled both ways would load either for the other.
SERIAL = {"sgd": sgd_serial_, "momentum": momentum_serial_, "adam": adam_serial_}
PARALLEL = {"sgd": sgd_, "momentum": momentum_, "adam": adam_}


def kernel(name: str, threads: int):
    """The kernel `name` ("sgd", "momentum", "adam") for `threads` threads: the serial twin
    for one (no launch lock needed), the prange kernel otherwise (launch under LAUNCH_LOCK,
    after `set_threads`)."""
    return (SERIAL if threads <= 1 else PARALLEL)[name]


def set_threads(n: int) -> int:
    """Threads the kernels use in the calling thread (numba's setting is per thread);
    clipped to numba's pool size. Returns the count set."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def warm(dtypes: tuple = (np.float32, np.float64),
         kernels: tuple[str, ...] = ("sgd", "momentum", "adam", "health"),
         threads: tuple[int, ...] = (1, 2)) -> None:
    """Compile (or load from numba's cache) `kernels` for `dtypes`, on tiny arrays: for a
    writable and a read-only gradient (one received through Ray's object store is read-only,
    and numba types it apart), so that no step ever compiles. `threads`: the variants, as
    `kernel` picks them (1: the serial twins; more: the prange kernels). "health": `health_`
    and `sum_health_` (over 2 ranks' gradients), which have no threaded variant."""
    tables = {id(t): t for t in (SERIAL if n <= 1 else PARALLEL for n in threads)}
    with LAUNCH_LOCK:
        for dt in dtypes:
            for table in tables.values():
                _warm_one(np.dtype(dt), kernels, table)


def _warm_one(dt: np.dtype, kernels: tuple[str, ...], table: dict) -> None:
    p, m, v = (np.zeros(4, dt) for _ in range(3))
    g_ro = np.zeros(4, dt)
    g_ro.flags.writeable = False
    starts, stops, segs, nseg = block_table([slice(0, 4)], 4)
    blk = np.zeros((2, starts.size))
    out = np.zeros((2, nseg))
    one, zero = dt.type(1.0), dt.type(0.0)
    for g in (np.zeros(4, dt), g_ro):
        if "sgd" in kernels:
            table["sgd"](p, g, starts, stops, segs, blk, out, zero, one, zero, zero)
        if "momentum" in kernels:
            table["momentum"](p, g, m, starts, stops, segs, blk, out, zero, one, zero, zero,
                              zero, True)
        if "adam" in kernels:
            table["adam"](p, g, m, v, starts, stops, segs, blk, out, zero, one, zero, zero, zero,
                          zero, zero, one, zero, zero, True)
        if "health" in kernels:
            ints = np.int32 if dt.itemsize == 4 else np.int64
            mask, sq = ints(-1), np.zeros(1)
            health_(g, g.view(ints), starts[:1], stops[:1], sq, mask)
    if "health" in kernels:
        sum_health_((p, m), 0, v, v.view(ints), starts[:1], stops[:1], sq, mask, v)


if __name__ == "__main__":  # `python -m distbackprop.kernels`: warm the cache (image build)
    warm()
    print(f"numba {numba.__version__}: update and health kernels compiled and cached "
          f"({numba.config.CACHE_DIR or 'numba default cache dir'})")
