"""The seed's Jacobian perspective, executable.

Backward computes vector–Jacobian products vᵀJ without ever forming J.
`local_jacobian` forms J explicitly for one example so tests can check
backward against it; `gradcheck` checks a whole model's ∂L/∂θ against central
finite differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """Relative error ‖g − g_fd‖ / (‖g‖ + ‖g_fd‖) overall and per parameter view.

    `kinks` maps a parameter view's name to how many of its entries had a finite-difference
    stencil crossing an activation's kink (some pre-activation on opposite sides of, or on,
    a kink at θ ± εe_i): there the difference quotient averages two one-sided slopes and
    says nothing about the subgradient convention, so those entries are reported, left out
    of `rel_error`, `per_param` and `max_abs_diff`, and do not decide `ok`. Views without
    such entries are absent. `n_checked` counts every entry differenced, kinked or not.
    """

    rel_error: float
    per_param: dict[str, float]
    max_abs_diff: float
    n_checked: int
    kinks: dict[str, int] = field(default_factory=dict)

    def ok(self, tol: float = 1e-6) -> bool:
        return self.rel_error < tol and all(e < tol for e in self.per_param.values())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) + np.linalg.norm(b))
    return 0.0 if den == 0.0 else float(np.linalg.norm(a - b)) / den


def _kinked_preactivations(model) -> list[tuple[int, tuple[float, ...]]]:
    """(index in model.layers, kinks) of every activation with kinks; [] for other models."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list):
        return []
    return [(i, lay.kinks) for i, lay in enumerate(layers)
            if isinstance(lay, Activation) and lay.kinks]


def _preactivations(model, x: np.ndarray, where: list[int]) -> list[np.ndarray]:
    """Copies of the inputs z to the activations at `where` (layer indices), one forward."""
    out = []
    h = np.asarray(x, dtype=model.dtype)
    for i, layer in enumerate(model.layers):
        if i in where:
            out.append(h.copy())
        h = layer.forward(h)
    for layer in model.layers:  # the layers' own caches (a wrapper's release_ may not reach them)
        layer.release_()
    return out


def _crosses(z_plus: list[np.ndarray], z_minus: list[np.ndarray],
             kinks: list[tuple[float, ...]]) -> bool:
    for zp, zm, ks in zip(z_plus, z_minus, kinks, strict=True):
        moved = zp != zm  # a pre-activation the parameter does not move cannot matter
        for k in ks:
            if np.any(((zp - k) * (zm - k) <= 0) & moved):
                return True
    return False


def gradcheck(model, x: np.ndarray, y: np.ndarray, loss: str, eps: float = 1e-6) -> GradcheckResult:
    """Check every parameter: analytic ∂L/∂θ_i against (L(θ+εe_i) − L(θ−εe_i)) / 2ε.

    Needs a float64 model (float32 cannot resolve ε). Restores the parameters. Entries whose
    stencil crosses an activation kink are counted in `GradcheckResult.kinks` and excluded
    from the comparison (see there).
    """
    if model.dtype != np.float64:
        raise ValueError("gradcheck needs a float64 model")
    model.loss_and_grad(x, y, loss)
    analytic = model.grads.copy()
    numeric = np.empty_like(analytic)
    kinked = np.zeros(analytic.shape, dtype=bool)
    watch = _kinked_preactivations(model)
    where, kinks = [i for i, _ in watch], [k for _, k in watch]
    p = model.params
    for i in range(p.size):
        old = p[i]
        p[i] = old + eps
        plus = model.loss_and_grad(x, y, loss)
        z_plus = _preactivations(model, x, where) if watch else []
        p[i] = old - eps
        minus = model.loss_and_grad(x, y, loss)
        z_minus = _preactivations(model, x, where) if watch else []
        p[i] = old
        numeric[i] = (plus - minus) / (2 * eps)
        kinked[i] = bool(watch) and _crosses(z_plus, z_minus, kinks)
    model.loss_and_grad(x, y, loss)  # leave grads consistent with params
    keep = ~kinked
    per = {name: _rel(analytic[sl][keep[sl]], numeric[sl][keep[sl]])
           for name, sl in model.buffer.offsets.items()}
    crossed = {name: int(np.count_nonzero(kinked[sl]))
               for name, sl in model.buffer.offsets.items() if kinked[sl].any()}
    diff = np.abs(analytic - numeric)[keep]
    return GradcheckResult(_rel(analytic[keep], numeric[keep]), per,
                           float(np.max(diff)) if diff.size else 0.0, p.size, crossed)
