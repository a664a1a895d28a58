"""Second order on the explicit engine: Hessian-vector products by Pearlmutter's R-operator.

For a direction v (laid out like the flat parameter buffer), R{·} = ∂/∂r (·)(θ + r v) at r = 0.
Applying R to every line of the forward and the backward pass of a `Sequential`
(Dense ↔ activation) gives Hv = R{∇θ L} exactly, at about 2–3× the cost of a gradient and
without ever forming H (Pearlmutter 1994, "Fast exact multiplication by the Hessian").

Forward (per Dense l, activation σ between):   z_l = h_{l−1} W_lᵀ + b_l,  h_l = σ(z_l)
R-forward:   R{z_l} = R{h_{l−1}} W_lᵀ + h_{l−1} V_lᵀ + v_bl,  R{h_l} = σ′(z_l) ⊙ R{z_l}
Backward:    δ_l = ∂L/∂z_l,  dW_l = δ_lᵀ h_{l−1},  δh_{l−1} = δ_l W_l,  δ_{l−1} = δh_{l−1} ⊙ σ′
R-backward:  R{dW_l} = R{δ_l}ᵀ h_{l−1} + δ_lᵀ R{h_{l−1}},  R{db_l} = Σ_batch R{δ_l},
             R{δh_{l−1}} = R{δ_l} W_l + δ_l V_l,
             R{δ_{l−1}} = R{δh_{l−1}} ⊙ σ′(z) + δh_{l−1} ⊙ σ″(z) ⊙ R{z}
Loss:        R{∂L/∂ŷ} = (∂²ℓ/∂ŷ²) R{ŷ} / denom  (mse: I; softmax-CE: diag(p) − ppᵀ; BCE: s(1−s))

On top: the explicit Hessian of a tiny model, the top eigenvalue by power iteration (the
"sharpness"), conjugate gradients, a truncated-Newton optimizer with Levenberg–Marquardt
damping, and the data-parallel form (per-shard HVPs with denom = global batch, SUM-allreduced).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from .layers import Activation, Dense
from .losses import loss_and_grad as _loss_and_grad
from .losses import loss_value


class _AllReduce(Protocol):
    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> np.ndarray: ...


def activation_derivatives(act: Activation, z: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(h, σ′(z), σ″(z)) elementwise for z: (batch, width); σ″ is None where it is 0 wherever
    it exists (relu, leaky relu, identity, hardtanh, and the straight-through estimators,
    whose σ′ is their surrogate).

    Each comes from the activation's own public methods: h from `apply_` (equal to
    `model.forward` bit for bit), σ′ from its backward (`derivative`), σ″ from `second`.
    """
    h = np.empty_like(z)
    act.apply_(z, h)
    return h, act.derivative(z), act.second(z)


class _DenseStep:
    __slots__ = ("name", "W", "slW", "slb", "h_in", "delta")

    def __init__(self, name: str, W: np.ndarray, slW: slice, slb: slice, h_in: np.ndarray):
        self.name, self.W, self.slW, self.slb, self.h_in = name, W, slW, slb, h_in
        self.delta: np.ndarray | None = None


class _ActStep:
    __slots__ = ("d1", "d2", "delta_h")

    def __init__(self, d1: np.ndarray, d2: np.ndarray | None):
        self.d1, self.d2 = d1, d2
        self.delta_h: np.ndarray | None = None


class HessianOperator:
    """The Hessian of L(θ) = Σ_rows ℓ(f(x; θ), y) / denom at θ = `model.params`, as an operator.

    Construction runs one forward and one backward (keeping z-derivatives and the
    back-propagated δ's); each `matvec(v)` then costs one R-forward and one R-backward.
    x: (batch, n_in); y as for `model.loss_and_grad`; v, Hv: (n_params,) flat.

    By default the parameters are copied, so the operator stays the linearization at the
    θ it was built at even if `model.params` changes later (MAML and Newton-CG rely on this).
    `need_grad=False` skips dW/db (a one-shot HVP needs only the δ's).
    """

    def __init__(self, model: Any, x: np.ndarray, y: np.ndarray, loss: str = "mse",
                 denom: float | None = None, copy_params: bool = True, need_grad: bool = True):
        self.dtype = model.dtype
        self.size = model.params.size
        self.loss_name = loss
        P = model.params.copy() if copy_params else model.params
        off = model.buffer.offsets
        h = np.asarray(x, dtype=self.dtype)
        self.denom = float(denom if denom is not None else max(h.shape[0], 1))
        self._steps: list[_DenseStep | _ActStep] = []
        for layer in model.layers:
            if isinstance(layer, Dense):
                slW, slb = off[f"{layer.name}.W"], off[f"{layer.name}.b"]
                W = P[slW].reshape(layer.W.shape)
                z = h @ W.T
                z += P[slb]
                self._steps.append(_DenseStep(layer.name, W, slW, slb, h))
                h = z
            elif isinstance(layer, Activation):
                h, d1, d2 = activation_derivatives(layer, h)
                self._steps.append(_ActStep(d1, d2))
            else:
                raise TypeError(f"HessianOperator: no R-operator for {type(layer).__name__}")
        if not self._steps or not isinstance(self._steps[0], _DenseStep):
            raise TypeError("HessianOperator: the model must start with a Dense layer")
        y_hat = h
        g = np.empty_like(y_hat)
        self.loss = _loss_and_grad(loss, y_hat, y, self.denom, g)
        # What the loss's Hessian w.r.t. ŷ needs: softmax p (CE) or sigmoid s (BCE).
        if loss == "cross_entropy":
            e = np.exp(y_hat - y_hat.max(axis=1, keepdims=True))
            self._curv = e / e.sum(axis=1, keepdims=True)
        elif loss == "bce":
            s = 0.5 * (1.0 + np.tanh(0.5 * y_hat))
            self._curv = s * (1.0 - s)
        else:
            self._curv = None
        self.grad = np.zeros(self.size, dtype=self.dtype) if need_grad else None
        delta = g
        for i in range(len(self._steps) - 1, -1, -1):
            st = self._steps[i]
            if isinstance(st, _DenseStep):
                st.delta = delta
                if self.grad is not None:
                    self.grad[st.slW] = (delta.T @ st.h_in).ravel()
                    self.grad[st.slb] = delta.sum(axis=0)
                if i > 0:
                    delta = delta @ st.W
            else:
                st.delta_h = delta
                delta = delta * st.d1

    def _loss_hvp(self, Ry: np.ndarray) -> np.ndarray:
        """R{∂L/∂ŷ} = (∂²ℓ/∂ŷ²) R{ŷ} / denom, per row."""
        if self.loss_name == "cross_entropy":
            p = self._curv
            out = p * Ry
            out -= p * out.sum(axis=1, keepdims=True)
        elif self.loss_name == "bce":
            out = self._curv * Ry
        else:
            out = Ry.copy()
        out *= 1.0 / self.denom
        return out

    def matvec(self, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Hv: v (n_params,) → (n_params,), written into `out` when given (and returned)."""
        v = np.asarray(v, dtype=self.dtype)
        if v.shape != (self.size,):
            raise ValueError(f"matvec: v has shape {v.shape}, expected ({self.size},)")
        if out is None:
            out = np.empty(self.size, dtype=self.dtype)
        steps = self._steps
        # R-forward; R{h_0} = 0 (the input does not depend on θ), tracked as None.
        Rh: np.ndarray | None = None
        Rh_in: list[np.ndarray | None] = []
        Rz_at: list[np.ndarray | None] = []
        Rz = None
        for st in steps:
            if isinstance(st, _DenseStep):
                V = v[st.slW].reshape(st.W.shape)
                Rz = st.h_in @ V.T
                Rz += v[st.slb]
                if Rh is not None:
                    Rz += Rh @ st.W.T
                Rh_in.append(Rh)
                Rz_at.append(None)
            else:
                Rh = st.d1 * Rz
                Rh_in.append(None)
                Rz_at.append(Rz)
        # R-backward.
        Rd = self._loss_hvp(Rz)
        for i in range(len(steps) - 1, -1, -1):
            st = steps[i]
            if isinstance(st, _DenseStep):
                OW = out[st.slW].reshape(st.W.shape)
                np.matmul(Rd.T, st.h_in, out=OW)
                if Rh_in[i] is not None:
                    OW += st.delta.T @ Rh_in[i]
                np.sum(Rd, axis=0, out=out[st.slb])
                if i > 0:
                    Rd = Rd @ st.W
                    Rd += st.delta @ v[st.slW].reshape(st.W.shape)
            else:
                Rd *= st.d1
                if st.d2 is not None:
                    Rd += st.delta_h * st.d2 * Rz_at[i]
        return out

    __matmul__ = matvec


def hvp(model: Any, x: np.ndarray, y: np.ndarray, v: np.ndarray, loss: str = "mse",
        denom: float | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """One Hessian-vector product H(θ) v of L = Σ_rows ℓ / denom at the current params.

    Uses the live parameters (no copy) and skips dW: forward + δ backward + R passes.
    """
    op = HessianOperator(model, x, y, loss, denom, copy_params=False, need_grad=False)
    return op.matvec(v, out)


def allreduce_hvp_(comm: _AllReduce, model: Any, x: np.ndarray, y: np.ndarray, v: np.ndarray,
                   denom: float, loss: str = "mse", out: np.ndarray | None = None) -> np.ndarray:
    """Data-parallel HVP: this rank's shard (x, y), scaled by the GLOBAL batch size `denom`,
    then SUM-allreduced in place, so every rank holds Σ_ranks H_r v = H_global v.

    `comm` is anything with `allreduce_(buf)` (LocalComm, MpiComm). Returns `out`.
    """
    out = hvp(model, x, y, v, loss=loss, denom=denom, out=out)
    comm.allreduce_(out)
    return out


def hessian_matrix(model: Any, x: np.ndarray, y: np.ndarray, loss: str = "mse",
                   denom: float | None = None) -> np.ndarray:
    """The explicit Hessian (n_params, n_params), column j = H e_j. For tiny models only."""
    op = HessianOperator(model, x, y, loss, denom)
    n = op.size
    H = np.empty((n, n), dtype=op.dtype)
    e = np.zeros(n, dtype=op.dtype)
    for j in range(n):
        e[j] = 1.0
        op.matvec(e, out=H[:, j])
        e[j] = 0.0
    return H


def power_iteration(matvec, n: int, iters: int = 20, rng: np.random.Generator | None = None,
                    tol: float = 1e-6, dtype=np.float64) -> tuple[float, np.ndarray, int]:
    """Eigenvalue of largest magnitude of a symmetric operator: v ← Av/‖Av‖, λ = vᵀAv.

    Stops after `iters` products or when |λ_k − λ_{k−1}| ≤ tol·|λ_k|.
    Returns (λ, unit eigenvector estimate, products used).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    v = rng.standard_normal(n).astype(dtype)
    v /= np.linalg.norm(v)
    lam_prev = math.nan
    lam = 0.0
    products = 0
    while products < iters:
        w = matvec(v)
        products += 1
        lam = float(np.dot(v, w))
        nw = float(np.linalg.norm(w))
        if nw == 0.0 or not math.isfinite(nw):
            break
        v = w / nw
        if abs(lam - lam_prev) <= tol * abs(lam):
            break
        lam_prev = lam
    return lam, v, products


def top_eigenvalue(model: Any, x: np.ndarray, y: np.ndarray, loss: str = "mse", iters: int = 20,
                   rng: np.random.Generator | None = None, denom: float | None = None,
                   comm: _AllReduce | None = None, tol: float = 1e-6) -> float:
    """Sharpness: the Hessian eigenvalue of largest magnitude at the current params (power
    iteration on R-operator HVPs; near a minimum this is the top, positive, eigenvalue).

    With `comm`, (x, y) is this rank's shard, `denom` must be the global batch, and each HVP is
    allreduced; pass every rank the same `rng` seed so all ranks iterate identical vectors.
    """
    if comm is not None and denom is None:
        raise ValueError("top_eigenvalue: with a communicator, denom must be the global batch")
    op = HessianOperator(model, x, y, loss, denom, copy_params=False, need_grad=False)

    def mv(v: np.ndarray) -> np.ndarray:
        w = op.matvec(v)
        if comm is not None:
            comm.allreduce_(w)
        return w

    lam, _, _ = power_iteration(mv, op.size, iters, rng, tol, dtype=op.dtype)
    return lam


def conjugate_gradient(matvec, b: np.ndarray, iters: int, tol: float = 1e-6,
                       damping: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Solve (A + λI) p = b from p₀ = 0 by at most `iters` CG steps (A symmetric).

    Stops when ‖r‖ ≤ tol‖b‖, or on non-positive curvature dᵀ(A+λI)d ≤ 0: then it returns the
    iterate so far, or p = b if that happens at the first step (the truncated-Newton rule).
    Returns (p, (A+λI)p, info with "iters", "residual", "negative_curvature").
    """
    p = np.zeros_like(b)
    Ap = np.zeros_like(b)
    r = b.copy()
    d = r.copy()
    rr = float(np.dot(r, r))
    bnorm = math.sqrt(rr)
    info: dict[str, Any] = {"iters": 0, "residual": 1.0 if bnorm else 0.0,
                            "negative_curvature": False}
    if bnorm == 0.0:
        return p, Ap, info
    for j in range(iters):
        Ad = matvec(d)
        if damping:
            Ad = Ad + damping * d
        curv = float(np.dot(d, Ad))
        if curv <= 0.0 or not math.isfinite(curv):
            info["negative_curvature"] = True
            if j == 0:
                p = b.copy()
                Ap = matvec(p) + damping * p
            break
        alpha = rr / curv
        p += alpha * d
        Ap += alpha * Ad
        r -= alpha * Ad
        rr_new = float(np.dot(r, r))
        info["iters"] = j + 1
        info["residual"] = math.sqrt(rr_new) / bnorm
        if info["residual"] <= tol:
            break
        d *= rr_new / rr
        d += r
        rr = rr_new
    return p, Ap, info


class NewtonCG:
    """Truncated Newton (Hessian-free) for small models: θ ← θ + p, (H + λI) p ≈ −g by CG.

    The damping λ follows Levenberg–Marquardt on ρ = (L(θ+p) − L(θ)) / (gᵀp + ½pᵀ(H+λI)p):
    ρ < ¼ → λ ← 3/2·λ, ρ > ¾ → λ ← 2/3·λ (Martens 2010). A step that does not lower the
    loss is rejected (θ restored), so the loss never increases.
    """

    def __init__(self, damping: float = 1e-3, cg_iters: int = 20, cg_tol: float = 1e-4,
                 min_damping: float = 1e-10, max_damping: float = 1e8, adapt: bool = True):
        self.damping = float(damping)
        self.cg_iters = int(cg_iters)
        self.cg_tol = float(cg_tol)
        self.min_damping = float(min_damping)
        self.max_damping = float(max_damping)
        self.adapt = adapt

    def step_(self, model: Any, x: np.ndarray, y: np.ndarray, loss: str = "mse",
              denom: float | None = None, comm: _AllReduce | None = None) -> dict[str, Any]:
        """One Newton-CG step; updates `model.params` in place, `model.grads` ← g at the start.

        Data-parallel with `comm`: (x, y) is this rank's shard and `denom` the global batch;
        loss, gradient and every HVP are SUM-allreduced, so all ranks take the same step.
        """
        if comm is not None and denom is None:
            raise ValueError("NewtonCG.step_: with a communicator, denom must be the global batch")
        op = HessianOperator(model, x, y, loss, denom)
        g = op.grad
        scalar = np.array([op.loss], dtype=np.float64)
        if comm is not None:
            comm.allreduce_(g)
            comm.allreduce_(scalar)
        L0 = float(scalar[0])
        model.grads[...] = g

        def mv(v: np.ndarray) -> np.ndarray:
            w = op.matvec(v)
            if comm is not None:
                comm.allreduce_(w)
            return w

        lam = self.damping
        p, Ap, info = conjugate_gradient(mv, -g, self.cg_iters, self.cg_tol, lam)
        predicted = float(np.dot(g, p) + 0.5 * np.dot(p, Ap))
        theta = model.params
        old = theta.copy()
        theta += p.astype(model.dtype, copy=False)
        y_hat = model.forward(x)
        scalar[0] = loss_value(loss, y_hat, y, op.denom)
        model.release_()
        if comm is not None:
            comm.allreduce_(scalar)
        L1 = float(scalar[0])
        actual = L1 - L0
        rho = actual / predicted if predicted < 0 else -math.inf
        accepted = math.isfinite(L1) and actual < 0
        if not accepted:
            model.params[...] = old
        if self.adapt:
            if rho < 0.25:
                lam *= 1.5
            elif rho > 0.75:
                lam *= 2.0 / 3.0
            self.damping = min(max(lam, self.min_damping), self.max_damping)
        return {"loss": L0, "new_loss": L1 if accepted else L0, "rho": rho,
                "damping": self.damping, "cg_iters": info["iters"],
                "cg_residual": info["residual"], "negative_curvature": info["negative_curvature"],
                "accepted": accepted}
