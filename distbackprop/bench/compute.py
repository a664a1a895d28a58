"""bench compute: one full training step of the reference MLP against the machine's GEMM rate.

Reference: 784-1024-1024-10, batch 256, float32, relu, softmax cross-entropy,
Adam. FLOPs per step = 6·B·Σ in·out (forward 2·B·in·out per layer, backward
twice that). The reference rate is a float32 1024×1024 matmul, timed in the
same process, interleaved with the step so both see the same machine load.
"""

from __future__ import annotations

import time

import numpy as np

from ..nn import MLP
from ..optim import make_optimizer

TITLE = "compute: reference MLP step vs float32 GEMM (same run)"
SIZES = (784, 1024, 1024, 10)
BATCH = 256


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info
    return max([i.get("num_threads", 1) for i in threadpool_info()
                if i.get("user_api") == "blas"] or [1])


def step_flops(sizes=SIZES, batch: int = BATCH) -> float:
    return 6.0 * batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def run(quick: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    model = MLP(SIZES, activation="relu", dtype=np.float32, seed=0)
    opt = make_optimizer("adam", model.params.size, np.float32,
                         segments=list(model.layer_slices().values()),
                         threads=_blas_threads())
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    c = np.empty_like(a)
    parts = {"forward": [], "backward": [], "update": [], "step": [], "gemm": []}

    def one_step():
        t0 = time.perf_counter()
        y_hat = model.forward(x)
        t1 = time.perf_counter()
        from ..nn.losses import loss_and_grad
        dy = np.empty_like(y_hat) if not hasattr(one_step, "dy") else one_step.dy
        one_step.dy = dy
        loss_and_grad("cross_entropy", y_hat, y, BATCH, dy)
        model.backward(dy)
        t2 = time.perf_counter()
        opt.step_(model.params, model.grads, 1e-3)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t3 - t0

    for _ in range(3):
        one_step()
        np.matmul(a, b, out=c)
    rounds = 10 if quick else 40
    for _ in range(rounds):
        f, bw, u, s = one_step()
        parts["forward"].append(f)
        parts["backward"].append(bw)
        parts["update"].append(u)
        parts["step"].append(s)
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        parts["gemm"].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in parts.items()}
    step_gflops = step_flops() / med["step"] / 1e9
    gemm_gflops = 2.0 * 1024**3 / med["gemm"] / 1e9
    from threadpoolctl import threadpool_info
    blas = ", ".join(f"{i.get('internal_api')}/{i.get('architecture')}×{i.get('num_threads')}"
                     for i in threadpool_info() if i.get("user_api") == "blas")
    return [{
        "step_ms": med["step"] * 1e3,
        "forward_ms": med["forward"] * 1e3,
        "backward_ms": med["backward"] * 1e3,
        "update_ms": med["update"] * 1e3,
        "step_GFLOP/s": step_gflops,
        "gemm_GFLOP/s": gemm_gflops,
        "ratio": step_gflops / gemm_gflops,
        "blas": blas,
    }]
