"""An implicit (equilibrium) layer, differentiated by the implicit function theorem.

    z* = f(z*) = tanh(W z* + U x + b),     ŷ = W_o z* + b_o

Forward: fixed-point iteration z_{k+1} = f(z_k) from z_0 = 0 until ‖z_{k+1} − z_k‖_∞ ≤ tol
(tanh is 1-Lipschitz, so ‖W‖₂ < 1 makes f a contraction and the iteration converge).
Backward: with g = ∂L/∂z*, d = 1 − z*² and J = ∂f/∂z = diag(d) W, the IFT gives
    ∂L/∂θ = vᵀ ∂f/∂θ   where   (I − J)ᵀ v = g,   i.e.   v = g + Wᵀ (d ⊙ v)
solved per example by the same kind of fixed-point iteration, or by a direct solve
(small widths). With u = d ⊙ v = ∂L/∂(pre-activation):  dW = Σ_batch u z*ᵀ, dU = Σ u xᵀ,
db = Σ u. No iterate is stored: memory is O(1) in the number of iterations.

`unrolled_loss_and_grad` backpropagates through the iterations themselves instead (the
reference the IFT gradient must equal at convergence).
"""

from __future__ import annotations

import math

import numpy as np

from .layers import Dense
from .losses import loss_and_grad as _loss_and_grad
from .params import FlatModel, ParamBuffer


class FixedPointError(ArithmeticError):
    """A fixed-point iteration did not converge; names where, after how many iterations,
    and the residual it reached."""

    def __init__(self, what: str, iterations: int, residual: float, tol: float, hint: str = ""):
        self.what, self.iterations, self.residual, self.tol = what, iterations, residual, tol
        msg = (f"{what}: fixed-point iteration did not converge after {iterations} iterations "
               f"(residual ‖z_k+1 − z_k‖∞ = {residual:.3e} > tol {tol:.1e})")
        super().__init__(msg + (f"; {hint}" if hint else ""))


class ImplicitModel(FlatModel):
    """An equilibrium layer of `n_hidden` units and a linear readout, over one `ParamBuffer`.

    Parameter names: ``implicit.W (H, H), implicit.U (H, n_in), implicit.b (H,), readout.W,
    readout.b``; layer names ``implicit``, ``readout``. W starts with ‖W‖₂ = `contraction`.
    After each pass, `forward_iterations` / `forward_residual` and `backward_iterations` /
    `backward_residual` tell how the solves went. `tol` is the forward's absolute stopping
    tolerance on ‖z_{k+1} − z_k‖∞; `adjoint_tol` (default: `tol`) the adjoint's relative one,
    ‖v_{k+1} − v_k‖∞ ≤ adjoint_tol · ‖g‖∞, so the gradient's relative accuracy does not
    depend on its scale (e.g. the 1/denom of a global-batch mean).
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int, dtype=np.float64,
                 seed: int | None = 0, rng: np.random.Generator | None = None,
                 contraction: float = 0.5, tol: float = 1e-10, max_iter: int = 500,
                 backward_method: str = "fixed_point", adjoint_tol: float | None = None):
        if backward_method not in ("fixed_point", "direct"):
            raise ValueError(f"backward_method: {backward_method!r} is not one of "
                             "fixed_point, direct")
        self.n_in, self.n_hidden, self.n_out = int(n_in), int(n_hidden), int(n_out)
        self.tol, self.max_iter, self.backward_method = float(tol), int(max_iter), backward_method
        # Relative, unlike the forward's absolute tol: the adjoint's right-hand side g scales
        # with the loss (1/denom), and its accuracy must not.
        self.adjoint_tol = self.tol if adjoint_tol is None else float(adjoint_tol)
        H = self.n_hidden
        self.buffer = ParamBuffer([("implicit.W", (H, H)), ("implicit.U", (H, self.n_in)),
                                   ("implicit.b", (H,)), ("readout.W", (self.n_out, H)),
                                   ("readout.b", (self.n_out,))], dtype=dtype)
        bf = self.buffer
        self.W, self.U, self.b = bf.param("implicit.W"), bf.param("implicit.U"), bf.param(
            "implicit.b")
        self.dW, self.dU, self.db = bf.grad("implicit.W"), bf.grad("implicit.U"), bf.grad(
            "implicit.b")
        self.readout = Dense("readout", bf.param("readout.W"), bf.param("readout.b"),
                             bf.grad("readout.W"), bf.grad("readout.b"))
        rng = rng or np.random.default_rng(seed)
        W0 = rng.standard_normal((H, H))
        self.W[...] = W0 * (contraction / np.linalg.norm(W0, 2))
        self.U[...] = rng.standard_normal(self.U.shape) * math.sqrt(2.0 / (self.n_in + H))
        self.readout.W[...] = rng.standard_normal(self.readout.W.shape) * math.sqrt(
            2.0 / (H + self.n_out))
        self._x: np.ndarray | None = None
        self._z: np.ndarray | None = None
        self.forward_iterations = self.backward_iterations = 0
        self.forward_residual = self.backward_residual = math.nan

    def layer_params(self) -> dict[str, list[str]]:
        return {"implicit": ["implicit.W", "implicit.U", "implicit.b"],
                "readout": ["readout.W", "readout.b"]}

    def project_(self, max_norm: float = 0.95) -> float:
        """In place: W ← W · min(1, max_norm / ‖W‖₂), keeping f a contraction after an
        optimizer step (projected gradient descent). Returns ‖W‖₂ before the projection."""
        s = float(np.linalg.norm(self.W, 2))
        if s > max_norm:
            self.W *= max_norm / s
        return s

    def _hint(self) -> str:
        if not np.all(np.isfinite(self.W)):
            return "W has non-finite entries"
        s = float(np.linalg.norm(self.W, 2))
        return (f"‖W‖₂ = {s:.3g}" + (" ≥ 1, so f need not be a contraction; scale W down "
                                      "(project_)" if s >= 1 else "; raise max_iter or tol"))

    # the equilibrium -------------------------------------------------------------------
    def solve(self, x: np.ndarray) -> np.ndarray:
        """z*: (batch, H) with z* = tanh(z* Wᵀ + x Uᵀ + b) for x: (batch, n_in).

        Raises `FixedPointError` (iterations, residual) if ‖z_{k+1} − z_k‖∞ > tol after
        `max_iter` iterations or the iterate turns non-finite.
        """
        x = np.asarray(x, dtype=self.dtype)
        c = x @ self.U.T
        c += self.b
        z = np.zeros((x.shape[0], self.n_hidden), dtype=self.dtype)
        nxt = np.empty_like(z)
        res, k = math.inf, 0
        for k in range(1, self.max_iter + 1):
            np.matmul(z, self.W.T, out=nxt)
            nxt += c
            np.tanh(nxt, out=nxt)
            res = float(np.max(np.abs(nxt - z))) if z.size else 0.0
            z, nxt = nxt, z
            if not math.isfinite(res):
                break
            if res <= self.tol:
                self.forward_iterations, self.forward_residual = k, res
                return z
        self.forward_iterations, self.forward_residual = k, res
        raise FixedPointError("implicit forward", k, res, self.tol,
                              self._hint())

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (batch, n_in) → ŷ: (batch, n_out); caches x and z* (not the iterates)."""
        x = np.asarray(x, dtype=self.dtype)
        z = self.solve(x)
        self._x, self._z = x, z
        return self.readout.forward(z)

    def adjoint(self, g: np.ndarray) -> np.ndarray:
        """u = d ⊙ v where (I − diag(d) W)ᵀ v = g, d = 1 − z*²: g (batch, H) → u (batch, H).

        fixed_point: v ← g + (d ⊙ v) W from v = g until ‖Δv‖∞ ≤ adjoint_tol·‖g‖∞ (relative:
        scaling g scales every iterate, so the stopping iteration and the relative error do
        not change); direct: one (H × H) solve per example, (I − Wᵀ diag(d_i)) v_i = g_i.
        """
        z = self._z
        d = 1.0 - z * z
        if self.backward_method == "direct":
            A = np.eye(self.n_hidden, dtype=self.dtype)[None] - self.W.T[None] * d[:, None, :]
            v = np.linalg.solve(A, g[..., None])[..., 0]
            self.backward_iterations, self.backward_residual = 1, 0.0
            return d * v
        scale = float(np.max(np.abs(g))) if g.size else 0.0
        if scale == 0.0:  # g = 0 ⇒ v = 0 exactly
            self.backward_iterations, self.backward_residual = 0, 0.0
            return np.zeros_like(g)
        v = g.copy()
        nxt = np.empty_like(v)
        res, k = math.inf, 0
        for k in range(1, self.max_iter + 1):
            np.multiply(v, d, out=nxt)
            nxt = nxt @ self.W
            nxt += g
            res = float(np.max(np.abs(nxt - v))) / scale
            v, nxt = nxt, v
            if not math.isfinite(res):
                break
            if res <= self.adjoint_tol:
                self.backward_iterations, self.backward_residual = k, res
                return d * v
        self.backward_iterations, self.backward_residual = k, res
        raise FixedPointError("implicit backward (adjoint)", k, res, self.adjoint_tol,
                              "residual relative to ‖g‖∞; " + self._hint())

    def backward(self, dy: np.ndarray, need_dx: bool = False) -> np.ndarray | None:
        """dy = ∂L/∂ŷ: (batch, n_out). Fills `grads` by the IFT; returns ∂L/∂x if asked."""
        if self._z is None:
            raise RuntimeError("ImplicitModel: backward without a forward")
        g = self.readout.backward(dy).copy()
        u = self.adjoint(g)
        np.matmul(u.T, self._z, out=self.dW)
        np.matmul(u.T, self._x, out=self.dU)
        np.sum(u, axis=0, out=self.db)
        self._x = self._z = None
        return u @ self.U if need_dx else None

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, loss: str = "mse",
                      denom: float | None = None) -> float:
        """Forward, loss, IFT backward. Returns Σ_rows ℓ / denom; `grads` ← its gradient."""
        y_hat = self.forward(x)
        d = float(denom if denom is not None else max(y_hat.shape[0], 1))
        dy = np.empty_like(y_hat)
        value = _loss_and_grad(loss, y_hat, y, d, dy)
        self.backward(dy)
        return value

    def unrolled_loss_and_grad(self, x: np.ndarray, y: np.ndarray, iterations: int,
                               loss: str = "mse", denom: float | None = None) -> float:
        """Reference: exactly `iterations` steps z_{k+1} = tanh(z_k Wᵀ + x Uᵀ + b) from z_0 = 0,
        ŷ = readout(z_K), and plain backprop through every step (all iterates stored):
        δa_k = δz_{k+1} ⊙ (1 − z_{k+1}²), dW += δa_kᵀ z_k, dU += δa_kᵀ x, δz_k = δa_k W.
        """
        x = np.asarray(x, dtype=self.dtype)
        c = x @ self.U.T + self.b
        Z = [np.zeros((x.shape[0], self.n_hidden), dtype=self.dtype)]
        for _ in range(iterations):
            Z.append(np.tanh(Z[-1] @ self.W.T + c))
        y_hat = self.readout.forward(Z[-1])
        d = float(denom if denom is not None else max(y_hat.shape[0], 1))
        dy = np.empty_like(y_hat)
        value = _loss_and_grad(loss, y_hat, y, d, dy)
        dz = self.readout.backward(dy).copy()
        self.dW.fill(0.0)
        self.dU.fill(0.0)
        self.db.fill(0.0)
        for k in range(iterations - 1, -1, -1):
            da = dz * (1.0 - Z[k + 1] ** 2)
            self.dW += da.T @ Z[k]
            self.dU += da.T @ x
            self.db += da.sum(axis=0)
            dz = da @ self.W
        return value

    def activation_bytes(self) -> int:
        """Exact bytes held for backward: x and z* (independent of the iteration count)."""
        return sum(a.nbytes for a in (self._x, self._z) if a is not None)


    def release_(self) -> None:
        self._x = self._z = None
        self.readout.release_()
