"""bench memory: gradient checkpointing vs the plain path on a 16-layer MLP, same run.

Model: 16 Dense layers, 512 wide (512-512-…-512-10), relu, batch 256, float32, softmax
cross-entropy, Adam. Both paths share one parameter buffer; a round times one plain step then
each checkpointed step, so all see the same machine load. `fwd_bwd` is forward + loss +
backward alone, `step` adds the Adam update; figures are medians, with 1 BLAS thread (a
worker's default). Activation bytes are counted exactly: `held` is what is stored for
backward after forward (what workers export as `activation_bytes`), `peak` the maximum held
at any point of the step (including the recomputed segment), `workspace` every buffer the
path has allocated. Gradients of the two paths are compared bit for bit.
"""

from __future__ import annotations

import time

import numpy as np

from ..nn import MLP
from ..nn.remat import CheckpointedMLP, plain_workspace_bytes
from ..optim import make_optimizer

TITLE = "memory: gradient checkpointing vs plain, 16-layer MLP (512 wide, batch 256, f32)"
DEPTH, WIDTH, BATCH, N_OUT = 16, 512, 256, 10
# A worker's default (--cpus-per-worker 1); multi-threaded BLAS on a shared 2-core machine
# made the two paths' timings swing by 10× between rounds.
BLAS_THREADS = 1


def run(quick: bool = False) -> list[dict]:
    from . import with_blas_threads
    return with_blas_threads(BLAS_THREADS, lambda: _run(quick))


def _run(quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    model = MLP([WIDTH] * DEPTH + [N_OUT], activation="relu", dtype=np.float32, seed=0)
    x = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
    y = rng.integers(0, N_OUT, BATCH)
    plain_params = model.params.copy()
    everies = (4,) if quick else (2, 4, 8)
    rounds = 8 if quick else 30

    # Memory and exactness, one step each, from the same parameters.
    model.forward(x)
    plain_held = model.activation_bytes()
    model.release_()
    model.loss_and_grad(x, y, "cross_entropy")
    plain_grads = model.grads.copy()
    paths = {"plain": model}
    mem = {"plain": (plain_held, plain_held, plain_workspace_bytes(model), 0.0)}
    for k in everies:
        c = CheckpointedMLP(model, every=k)
        c.forward(x)
        held = c.activation_bytes()
        c.release_()
        c.loss_and_grad(x, y, "cross_entropy")
        diff = float(np.max(np.abs(model.grads - plain_grads)))
        mem[f"every={k}"] = (held, c.peak_activation_bytes, c.workspace_bytes(), diff)
        paths[f"every={k}"] = c

    opts = {name: make_optimizer("adam", model.params.size, np.float32) for name in paths}

    def step(name: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        paths[name].loss_and_grad(x, y, "cross_entropy")
        t1 = time.perf_counter()
        opts[name].step_(model.params, model.grads, 1e-4)
        return t1 - t0, time.perf_counter() - t0

    grad_t: dict[str, list[float]] = {name: [] for name in paths}
    step_t: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds + 2):
        for name in paths:
            model.params[...] = plain_params  # every path steps from the same point
            g, t = step(name)
            if r >= 2:  # warm-up rounds
                grad_t[name].append(g)
                step_t[name].append(t)
    med = {name: float(np.median(v)) for name, v in step_t.items()}
    med_grad = {name: float(np.median(v)) for name, v in grad_t.items()}
    rows = []
    base_held, base_peak, _, _ = mem["plain"]
    for name in paths:
        held, peak, ws, diff = mem[name]
        rows.append({
            "path": name,
            "held_MiB": held / 2**20,
            "peak_MiB": peak / 2**20,
            "workspace_MiB": ws / 2**20,
            "held_reduction": base_held / held,
            "peak_reduction": base_peak / peak,
            "fwd_bwd_ms": med_grad[name] * 1e3,
            "fwd_bwd_ratio": med_grad[name] / med_grad["plain"],
            "step_ms": med[name] * 1e3,
            "time_ratio": med[name] / med["plain"],
            "max_abs_grad_diff": diff,
        })
    return rows
