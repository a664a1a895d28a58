"""bench compute: one full training step of the reference MLP against the machine's GEMM rate,
and the update against its memory floor.

Reference: 784-1024-1024-10, batch 256, float32, relu, softmax cross-entropy,
Adam. FLOPs per step = 6·B·Σ in·out (forward 2·B·in·out per layer, backward
twice that). The reference rate is a float32 1024×1024 matmul, timed in the
same process, interleaved with the step so both see the same machine load.

The update's floor: Adam reads θ, g, m, v and writes θ, m, v, 7 arrays of n floats. A
pass with exactly those 7 streams and no arithmetic (same threads, same blocks) is
timed in the same rounds; floor = 7·n·itemsize ÷ that pass's bandwidth. The update is
timed twice per round: inside the step (right after backward, as training runs it, when
BLAS threads may still be spinning) and alone (after a 0.2 s pause, BLAS threads asleep).
Each round times a step that follows an untimed one, as steps follow each other in training.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from ..nn import MLP
from ..optim import UpdateRule

TITLE = "compute: reference MLP step vs float32 GEMM, update vs its memory floor (same run)"
SIZES = (784, 1024, 1024, 10)
BATCH = 256
PAUSE = 0.2  # s before the "alone" update: longer than OpenBLAS's default spin (2^28 cycles)


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info
    return max([i.get("num_threads", 1) for i in threadpool_info()
                if i.get("user_api") == "blas"] or [1])


def step_flops(sizes=SIZES, batch: int = BATCH) -> float:
    return 6.0 * batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _stream_pass():
    """The update's memory traffic without its arithmetic: read p, g, m, v; write p, m, v.
    Same blocks, threads and compiler options as the kernels (so it vectorises the same)."""
    from numba import njit, prange

    from ..kernels import _OPTS

    @njit(**_OPTS)
    def block_(p, g, m, v):
        for i in range(p.size):
            gi = g[i]
            p[i] = p[i] + gi
            m[i] = m[i] + gi
            v[i] = v[i] + gi

    @njit(parallel=True, **_OPTS)
    def stream_(p, g, m, v, starts, stops):
        for b in prange(starts.size):
            lo, hi = starts[b], stops[b]
            block_(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi])
    return stream_


def reference_step(threads: int = 1, seed: int = 0
                   ) -> tuple[MLP, UpdateRule, Callable[[], tuple[float, float, float, float]]]:
    """The reference step on fixed random data: (model, Adam rule, one_step), one_step()
    running forward, softmax cross-entropy + backward, and the update in place, and
    returning their seconds and the whole step's: (forward, backward, update, step)."""
    from ..nn.losses import loss_and_grad
    rng = np.random.default_rng(seed)
    model = MLP(SIZES, activation="relu", dtype=np.float32, seed=seed)
    cfg = SimpleNamespace(optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0,
                          clip_norm=None, lr_schedule="constant", warmup_steps=0,
                          lr_step_size=1000, lr_gamma=0.1, cpus_per_worker=threads)
    rule = UpdateRule.from_config(cfg, model.params.size, np.float32,
                                  list(model.layer_slices().values()), total_steps=10**9)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    dy = np.empty((BATCH, SIZES[-1]), np.float32)
    step_no = [0]

    def one_step() -> tuple[float, float, float, float]:
        t0 = time.perf_counter()
        y_hat = model.forward(x)
        t1 = time.perf_counter()
        loss_and_grad("cross_entropy", y_hat, y, BATCH, dy)
        model.backward(dy)
        t2 = time.perf_counter()
        rule.step_(model.params, model.grads, step_no[0], 1.0)
        t3 = time.perf_counter()
        step_no[0] += 1
        return t1 - t0, t2 - t1, t3 - t2, t3 - t0

    return model, rule, one_step


def run(quick: bool = False) -> list[dict]:
    from ..kernels import block_table
    rng = np.random.default_rng(0)
    threads = _blas_threads()
    model, rule, one_step = reference_step(threads)
    n = model.params.size
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    c = np.empty_like(a)
    arrays = [np.zeros(n, np.float32) for _ in range(4)]
    starts, stops, _, _ = block_table([slice(0, n)], n)
    stream_ = _stream_pass()
    copy_src, copy_dst = np.ones(n, np.float32), np.empty(n, np.float32)
    parts: dict[str, list[float]] = {k: [] for k in (
        "forward", "backward", "update", "step", "gemm", "update_alone", "stream", "copy")}

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(3):
        one_step()
        np.matmul(a, b, out=c)
        stream_(*arrays, starts, stops)
    rounds = 10 if quick else 40
    for _ in range(rounds):
        time.sleep(PAUSE)
        parts["update_alone"].append(
            timed(lambda: rule.step_(model.params, model.grads, 0, 1.0)))  # constant lr
        parts["stream"].append(timed(lambda: stream_(*arrays, starts, stops)))
        parts["copy"].append(timed(lambda: np.copyto(copy_dst, copy_src)))
        # An untimed step first, so the timed one starts as in training: right after the
        # previous step's update, its arrays in cache and BLAS threads awake.
        one_step()
        f, bw, u, s = one_step()
        parts["forward"].append(f)
        parts["backward"].append(bw)
        parts["update"].append(u)
        parts["step"].append(s)
        parts["gemm"].append(timed(lambda: np.matmul(a, b, out=c)))
    return _rows(parts, n, rule, threads)


def _rows(parts: dict[str, list[float]], n: int, rule: UpdateRule, threads: int) -> list[dict]:
    """The table: medians of each part, the step against the GEMM rate, the update against
    its memory floor (7 arrays of `n` float32 through one streaming pass)."""
    from ..kernels import FASTMATH, numba
    med = {k: float(np.median(v)) for k, v in parts.items()}
    q = {k: (float(np.percentile(v, 25)) * 1e3, float(np.percentile(v, 75)) * 1e3)
         for k, v in parts.items()}
    step_gflops = step_flops() / med["step"] / 1e9
    gemm_gflops = 2.0 * 1024**3 / med["gemm"] / 1e9
    nbytes = 7 * n * 4
    stream_gbs = nbytes / med["stream"] / 1e9
    floor = med["stream"]  # = 7·n·4 bytes ÷ stream_gbs
    from threadpoolctl import threadpool_info
    blas = ", ".join(f"{i.get('internal_api')}/{i.get('architecture')}×{i.get('num_threads')}"
                     for i in threadpool_info() if i.get("user_api") == "blas")
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "default")

    def iqr(k: str) -> str:
        return f"IQR {q[k][0]:.3g}–{q[k][1]:.3g} ms"

    return [
        {"measure": "step: forward + backward + update", "ms": med["step"] * 1e3,
         "GFLOP/s": step_gflops, "relative": step_gflops / gemm_gflops,
         "reference": f"GEMM rate, same run ({iqr('step')})"},
        {"measure": "forward", "ms": med["forward"] * 1e3, "reference": iqr("forward")},
        {"measure": "backward (+ loss)", "ms": med["backward"] * 1e3,
         "reference": iqr("backward")},
        {"measure": "update, inside the step (after backward)", "ms": med["update"] * 1e3,
         "relative": med["update"] / floor, "reference": f"memory floor ({iqr('update')})"},
        {"measure": f"update alone ({PAUSE:g} s after the step)",
         "ms": med["update_alone"] * 1e3, "relative": med["update_alone"] / floor,
         "reference": f"memory floor ({iqr('update_alone')})"},
        {"measure": f"update memory floor: 7 × {n * 4 / 1e6:.2f} MB at {stream_gbs:.1f} GB/s",
         "ms": floor * 1e3, "reference": f"7-stream pass, no arithmetic, {threads} threads"},
        {"measure": "NumPy copy (1 thread), for comparison",
         "ms": med["copy"] * 1e3,
         "reference": f"{2 * n * 4 / med['copy'] / 1e9:.1f} GB/s (read + write)"},
        {"measure": "float32 GEMM 1024³", "ms": med["gemm"] * 1e3, "GFLOP/s": gemm_gflops,
         "reference": iqr("gemm")},
        {"measure": "configuration",
         "reference": f"blas {blas}, OPENBLAS_THREAD_TIMEOUT={timeout}; update: numba "
                      f"{numba.__version__} {numba.threading_layer()} ×{rule.threads}, "
                      f"fastmath {{{','.join(sorted(FASTMATH))}}} on the Σ only"},
    ]
