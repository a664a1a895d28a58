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


def cross_entropy(z: np.ndarray, y: np.ndarray, denom: float, out: np.ndarray,
                  label_smoothing: float = 0.0) -> float:
    """Softmax cross-entropy on integer labels: Σ_rows (logsumexp(z) − Σ_c t_c z_c) / denom,
    with targets t = (1 − ε)·onehot(y) + ε/C (ε = `label_smoothing`; ε = 0: t = onehot).

    ∂L/∂z = (softmax(z) − t)/denom. z: (batch, classes); y: (batch,) ints.
    Stable: the row maximum is subtracted before exponentiating (Σ_c t_c = 1, so the shift
    cancels in the loss). ε = 0 runs exactly the unsmoothed arithmetic.
    """
    rows = np.arange(z.shape[0])
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)
    picked = out[rows, y]
    if label_smoothing:
        eps, classes = float(label_smoothing), z.shape[1]
        picked = (1.0 - eps) * picked + (eps / classes) * out.sum(axis=1)  # Σ_c t_c z_c
    np.exp(out, out=out)
    s = out.sum(axis=1, keepdims=True)
    value = float(np.sum(np.log(s[:, 0]) - picked)) / denom
    out /= s
    if label_smoothing:
        out[rows, y] -= 1.0 - eps
        out -= eps / classes
    else:
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


def check_label_smoothing(loss: str, label_smoothing: float) -> None:
    """ε in [0, 1), and nonzero only with cross_entropy; ValueError naming `label_smoothing`."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: must be in [0, 1), got {label_smoothing!r}")
    if label_smoothing and loss != "cross_entropy":
        raise ValueError(f"label_smoothing: only meaningful with cross_entropy, not {loss!r}")


def loss_and_grad(name: str, y_hat: np.ndarray, y: np.ndarray, denom: float,
                  out: np.ndarray, label_smoothing: float = 0.0) -> float:
    """Dispatch by loss name; writes ∂L/∂ŷ into `out` (same shape as `y_hat`).

    `label_smoothing` ε (cross_entropy only) smooths the targets to (1 − ε)·onehot + ε/C.
    """
    try:
        fn = _FUNCS[name]
    except KeyError:
        raise ValueError(f"loss: {name!r} is not one of {', '.join(LOSSES)}") from None
    if label_smoothing:
        check_label_smoothing(name, label_smoothing)
    if y_hat.shape[0] == 0:
        out.fill(0)
        return 0.0
    if label_smoothing:
        return cross_entropy(y_hat, y, denom, out, label_smoothing)
    return fn(y_hat, y, denom, out)


def loss_value(name: str, y_hat: np.ndarray, y: np.ndarray, denom: float | None = None,
               label_smoothing: float = 0.0) -> float:
    """Loss only (evaluation); batch mean unless `denom` is given."""
    scratch = np.empty_like(y_hat)
    return loss_and_grad(name, y_hat, y, denom or max(y_hat.shape[0], 1), scratch,
                         label_smoothing)
