"""bench rnn: one BPTT step of a tanh RNN against three times its forward GEMMs (same run).

Shapes: batch B = 64, T = 50 steps, state H = 256, F = 32 input features, float32, a
10-class readout of the last step (`SequenceRNN`, cross-entropy). The reference is the
GEMM time of the same shapes — the input projection (T·B × F)·(F × H), T recurrent
(B × H)·(H × H) products and the readout (T·B × H)·(H × 10) — times three (backward
needs about twice the forward's matrix work: ∂L/∂h_{t−1} = δa_t W_h and the weight
gradients). ratio = BPTT step / (3 × forward GEMMs): what the step costs beyond its matrix
products (tanh, the element-wise δa_t = δh_t ⊙ (1 − h_t²), the per-time norms, Python's
per-step loop). Both are timed interleaved, so both see the same machine load.
"""

from __future__ import annotations

import time

import numpy as np

from ..nn.rnn import SequenceRNN

TITLE = "rnn: BPTT step (B=64, T=50, H=256, F=32, float32) vs 3 x its forward GEMMs"
B, T, H, F, C = 64, 50, 256, 32, 10


def _forward_gemms(model: SequenceRNN, x: np.ndarray, ws: dict) -> None:
    """Only the matrix products of a forward pass, same shapes, into preallocated outputs."""
    np.matmul(x.reshape(T * B, F), model.W_x.T, out=ws["A"])
    Hs = ws["H"]
    for t in range(T):
        np.matmul(Hs[t], model.W_h.T, out=Hs[t + 1])
    np.matmul(Hs[1:].reshape(T * B, H), model.readout.W.T, out=ws["Y"])


def run(quick: bool = False) -> list[dict]:
    """One row with the process's BLAS threads, one with 1 (a --cpus-per-worker 1 worker)."""
    from threadpoolctl import threadpool_info

    from . import with_blas_threads
    threads = max([i.get("num_threads", 1) for i in threadpool_info()
                   if i.get("user_api") == "blas"] or [1])
    rows = [{"blas_threads": threads, **_measure(quick)}]
    if threads > 1:
        rows.append({"blas_threads": 1, **with_blas_threads(1, lambda: [_measure(quick)])[0]})
    return rows


def _measure(quick: bool) -> dict:
    rng = np.random.default_rng(0)
    model = SequenceRNN(F, H, C, T, dtype=np.float32, seed=0)
    x = rng.standard_normal((B, T * F)).astype(np.float32)
    y = rng.integers(0, C, B)
    x_tm = np.ascontiguousarray(x.reshape(B, T, F).transpose(1, 0, 2))
    ws = {"A": np.empty((T * B, H), np.float32), "H": np.zeros((T + 1, B, H), np.float32),
          "Y": np.empty((T * B, C), np.float32)}
    parts: dict[str, list[float]] = {"step": [], "forward": [], "gemm": []}

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        model.forward(x)
        t1 = time.perf_counter()
        model.release_()
        t2 = time.perf_counter()
        model.loss_and_grad(x, y, "cross_entropy")
        return time.perf_counter() - t2, t1 - t0

    for _ in range(3):
        step()
        _forward_gemms(model, x_tm, ws)
    for _ in range(8 if quick else 30):
        s, f = step()
        parts["step"].append(s)
        parts["forward"].append(f)
        t0 = time.perf_counter()
        _forward_gemms(model, x_tm, ws)
        parts["gemm"].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in parts.items()}
    flops = 2.0 * (T * B * F * H + T * B * H * H + T * B * H * C)  # forward GEMMs
    return {
        "bptt_step_ms": med["step"] * 1e3,
        "forward_ms": med["forward"] * 1e3,
        "forward_gemms_ms": med["gemm"] * 1e3,
        "3x_gemms_ms": 3 * med["gemm"] * 1e3,
        "gemm_GFLOP/s": flops / med["gemm"] / 1e9,
        "ratio": med["step"] / (3 * med["gemm"]),
    }
