"""bench hvp: a Hessian-vector product (Pearlmutter R-operator) vs a gradient, same model, same run.

Model: the compute reference 784-1024-1024-10, batch 256, float32, softmax cross-entropy,
with relu (σ″ = 0) and tanh (σ″ ≠ 0). `grad` is `model.loss_and_grad` (forward + backward);
`hvp` a one-shot H·v from scratch (forward, δ backward, R-forward, R-backward); `matvec` one
more H·v on an operator already built at θ (what power iteration and CG pay per product).
Each round times the three back to back; figures are medians, with 1 BLAS thread.
"""

from __future__ import annotations

import time

import numpy as np

from ..nn import MLP
from ..nn.hessian import HessianOperator, hvp

TITLE = "hvp: Hessian-vector product vs gradient, 784-1024-1024-10, batch 256, f32"
SIZES = (784, 1024, 1024, 10)
BATCH = 256
# A worker's default (--cpus-per-worker 1); see bench/memory.py.
BLAS_THREADS = 1


def run(quick: bool = False) -> list[dict]:
    from . import with_blas_threads
    return with_blas_threads(BLAS_THREADS, lambda: _run(quick))


def _run(quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    rounds = 8 if quick else 30
    rows = []
    for activation in ("relu", "tanh"):
        model = MLP(SIZES, activation=activation, dtype=np.float32, seed=0)
        v = rng.standard_normal(model.params.size).astype(np.float32)
        out = np.empty_like(v)
        op = HessianOperator(model, x, y, "cross_entropy")
        timed = {
            "grad": lambda m=model: m.loss_and_grad(x, y, "cross_entropy"),
            "hvp": lambda m=model, v=v, out=out: hvp(m, x, y, v, "cross_entropy", out=out),
            "matvec": lambda o=op, v=v, out=out: o.matvec(v, out=out),
        }
        times: dict[str, list[float]] = {k: [] for k in timed}
        for r in range(rounds + 2):
            for name, fn in timed.items():
                t0 = time.perf_counter()
                fn()
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
        med = {k: float(np.median(t)) for k, t in times.items()}
        rows.append({
            "activation": activation,
            "grad_ms": med["grad"] * 1e3,
            "hvp_ms": med["hvp"] * 1e3,
            "matvec_ms": med["matvec"] * 1e3,
            "hvp/grad": med["hvp"] / med["grad"],
            "matvec/grad": med["matvec"] / med["grad"],
        })
    return rows
