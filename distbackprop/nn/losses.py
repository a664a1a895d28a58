"""Losses as (value, ∂L/∂ŷ) pairs, summed over rows and divided by `denom`.

`denom` is the *global* batch size: each data-parallel worker divides its rows'
contributions by it, so the SUM-allreduce of the workers' values and
gradients is the global batch mean (see the README, mean-gradient
semantics). With one process, ``denom = batch``.
"""

from __future__ import annotations

import numpy as np

LOSSES = ("mse", "cross_entropy", "bce")


def mse(y_hat: np.ndarray, y: np.ndarray, denom: float, out: np.ndarray) -> float:
    """The seed's L = ½‖ŷ − y‖² per row, averaged: Σ_rows ½‖ŷ−y‖² / denom; ∂L/∂ŷ = (ŷ − y)/denom.

    y_hat: (batch, k); y: (batch, k) or (batch,) when k = 1; out ← ∂L/∂ŷ.
    """
    np.subtract(y_hat, y.reshape(y_hat.shape), out=out)
    value = 0.5 * float(np.vdot(out, out)) / denom
    out *= 1.0 / denom
    return value


def cross_entropy(z: np.ndarray, y: np.ndarray, denom: float, out: np.ndarray) -> float:
    """Softmax cross-entropy on integer labels: Σ_rows (logsumexp(z) − z_y) / denom.

    ∂L/∂z = (softmax(z) − onehot(y))/denom. z: (batch, classes); y: (batch,) ints.
    Stable: the row maximum is subtracted before exponentiating.
    """
    rows = np.arange(z.shape[0])
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)
    picked = out[rows, y]
    np.exp(out, out=out)
    s = out.sum(axis=1, keepdims=True)
    value = float(np.sum(np.log(s[:, 0]) - picked)) / denom
    out /= s
    out[rows, y] -= 1.0
    out *= 1.0 / denom
    return value


def bce_with_logits(z: np.ndarray, y: np.ndarray, denom: float, out: np.ndarray) -> float:
    """Binary cross-entropy on logits: Σ (max(z,0) − z·y + log1p(e^{−|z|})) / denom.

    ∂L/∂z = (sigmoid(z) − y)/denom. z: (batch, k); y: same shape or (batch,) when k = 1.
    """
    y = y.reshape(z.shape).astype(z.dtype, copy=False)
    value = float(np.sum(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))) / denom
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    out -= y
    out *= 1.0 / denom
    return value


_FUNCS = {"mse": mse, "cross_entropy": cross_entropy, "bce": bce_with_logits}


def loss_and_grad(name: str, y_hat: np.ndarray, y: np.ndarray, denom: float,
                  out: np.ndarray) -> float:
    """Dispatch by loss name; writes ∂L/∂ŷ into `out` (same shape as `y_hat`)."""
    try:
        fn = _FUNCS[name]
    except KeyError:
        raise ValueError(f"loss: {name!r} is not one of {', '.join(LOSSES)}") from None
    if y_hat.shape[0] == 0:
        out.fill(0)
        return 0.0
    return fn(y_hat, y, denom, out)


def loss_value(name: str, y_hat: np.ndarray, y: np.ndarray, denom: float | None = None) -> float:
    """Loss only (evaluation); batch mean unless `denom` is given."""
    scratch = np.empty_like(y_hat)
    return loss_and_grad(name, y_hat, y, denom or max(y_hat.shape[0], 1), scratch)
