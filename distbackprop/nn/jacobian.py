"""The seed's Jacobian perspective, executable.

Backward computes vector–Jacobian products vᵀJ without ever forming J.
`local_jacobian` forms J explicitly for one example so tests can check
backward against it; `gradcheck` checks a whole model's ∂L/∂θ against central
finite differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import Activation, Dense, Layer


def local_jacobian(layer: Layer, x: np.ndarray, wrt: str = "input") -> np.ndarray:
    """Dense Jacobian of `layer`'s output for one example x: (in,).

    wrt="input": ∂y/∂x, shape (out, in) — for Dense that is W; for an
    activation diag(σ′(z)). wrt="W" (Dense only): ∂z/∂vec(W), shape
    (out, out·in) with W flattened row-major, entries ∂z_i/∂W_ij = x_j.
    wrt="b" (Dense only): ∂z/∂b = I (out, out).
    """
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"local_jacobian takes one example of shape (in,), got {x.shape}")
    if isinstance(layer, Dense):
        n_out, n_in = layer.W.shape
        if wrt == "input":
            return layer.W.copy()
        if wrt == "W":
            J = np.zeros((n_out, n_out * n_in), dtype=layer.W.dtype)
            for i in range(n_out):
                J[i, i * n_in:(i + 1) * n_in] = x
            return J
        if wrt == "b":
            return np.eye(n_out, dtype=layer.W.dtype)
        raise ValueError(f"wrt: {wrt!r} is not one of input, W, b")
    if isinstance(layer, Activation):
        if wrt != "input":
            raise ValueError(f"{type(layer).__name__} has no parameters (wrt={wrt!r})")
        return np.diag(layer.derivative(x[None, :])[0])
    raise TypeError(f"no Jacobian for {type(layer).__name__}")


@dataclass(frozen=True)
class GradcheckResult:
    """Relative error ‖g − g_fd‖ / (‖g‖ + ‖g_fd‖) overall and per parameter view."""

    rel_error: float
    per_param: dict[str, float]
    max_abs_diff: float
    n_checked: int

    def ok(self, tol: float = 1e-6) -> bool:
        return self.rel_error < tol and all(e < tol for e in self.per_param.values())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) + np.linalg.norm(b))
    return 0.0 if den == 0.0 else float(np.linalg.norm(a - b)) / den


def gradcheck(model, x: np.ndarray, y: np.ndarray, loss: str, eps: float = 1e-6) -> GradcheckResult:
    """Check every parameter: analytic ∂L/∂θ_i against (L(θ+εe_i) − L(θ−εe_i)) / 2ε.

    Needs a float64 model (float32 cannot resolve ε). Restores the parameters.
    """
    if model.dtype != np.float64:
        raise ValueError("gradcheck needs a float64 model")
    model.loss_and_grad(x, y, loss)
    analytic = model.grads.copy()
    numeric = np.empty_like(analytic)
    p = model.params
    for i in range(p.size):
        old = p[i]
        p[i] = old + eps
        plus = model.loss_and_grad(x, y, loss)
        p[i] = old - eps
        minus = model.loss_and_grad(x, y, loss)
        p[i] = old
        numeric[i] = (plus - minus) / (2 * eps)
    model.loss_and_grad(x, y, loss)  # leave grads consistent with params
    per = {name: _rel(analytic[sl], numeric[sl]) for name, sl in model.buffer.offsets.items()}
    return GradcheckResult(_rel(analytic, numeric), per,
                           float(np.max(np.abs(analytic - numeric))) if p.size else 0.0, p.size)
