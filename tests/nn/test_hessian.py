"""Hessian-vector products (R-operator): float64 finite differences, explicit Hessians,
power iteration, Newton-CG, and the data-parallel form (shards summed = full batch)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from distbackprop.comm import LocalComm
from distbackprop.nn import ACTIVATIONS, MLP
from distbackprop.nn.hessian import (
    HessianOperator,
    NewtonCG,
    activation_derivatives,
    allreduce_hvp_,
    conjugate_gradient,
    hessian_matrix,
    hvp,
    power_iteration,
    top_eigenvalue,
)
from distbackprop.nn.layers import make_activation
from tests.nn.test_gradients import LOSS_CASES, _targets


def _model(sizes, activation="tanh", seed=0) -> MLP:
    """Random non-zero biases: with zero biases a dead relu row puts z exactly on the kink."""
    m = MLP(sizes, activation=activation, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for d in m.dense_layers:
        d.b[...] = 0.3 * rng.standard_normal(d.b.shape)
    return m


def _fd_hvp(model, x, y, v, loss, denom=None, eps=1e-5) -> np.ndarray:
    """(∇L(θ + εv) − ∇L(θ − εv)) / 2ε."""
    p0 = model.params.copy()
    model.params[...] = p0 + eps * v
    model.loss_and_grad(x, y, loss, denom)
    gp = model.grads.copy()
    model.params[...] = p0 - eps * v
    model.loss_and_grad(x, y, loss, denom)
    gm = model.grads.copy()
    model.params[...] = p0
    return (gp - gm) / (2 * eps)


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(a) + np.linalg.norm(b)))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_second_derivatives_match_finite_differences(name: str) -> None:
    act = make_activation(name)
    rng = np.random.default_rng(0)
    z = rng.uniform(-3, 3, (4, 50))
    z[np.abs(z) < 1e-3] = 0.5  # keep relu-like kinks out of the stencil
    h, d1, d2 = activation_derivatives(act, z)
    ref_h = np.empty_like(z)
    act.apply_(z, ref_h)
    np.testing.assert_array_equal(h, ref_h)
    np.testing.assert_allclose(d1, act.derivative(z), rtol=1e-12, atol=1e-14)
    eps = 1e-5
    fd2 = (act.derivative(z + eps) - act.derivative(z - eps)) / (2 * eps)
    np.testing.assert_allclose(np.zeros_like(z) if d2 is None else d2, fd2, atol=1e-8)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss,n_out", LOSS_CASES)
def test_hvp_matches_finite_differences_of_gradients(activation: str, loss: str,
                                                     n_out: int) -> None:
    rng = np.random.default_rng(1)
    model = _model([5, 6, 7, n_out], activation, seed=2)
    x = rng.standard_normal((8, 5))
    y = _targets(loss, n_out, 8, rng)
    v = rng.standard_normal(model.params.size)
    got = hvp(model, x, y, v, loss)
    assert _rel(got, _fd_hvp(model, x, y, v, loss)) < 1e-7


def test_operator_gradient_and_loss_equal_the_models() -> None:
    rng = np.random.default_rng(2)
    model = _model([4, 8, 3], "gelu")
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    op = HessianOperator(model, x, y, "cross_entropy", denom=10.0)
    value = model.loss_and_grad(x, y, "cross_entropy", denom=10.0)
    assert op.loss == pytest.approx(value, rel=1e-14)
    np.testing.assert_allclose(op.grad, model.grads, rtol=1e-12, atol=1e-15)


def test_operator_is_a_snapshot_of_theta() -> None:
    """Built at θ, it keeps answering for θ after the model's parameters move."""
    rng = np.random.default_rng(3)
    model = _model([3, 5, 2], "tanh")
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    v = rng.standard_normal(model.params.size)
    op = HessianOperator(model, x, y, "mse")
    before = op.matvec(v)
    model.params[...] += 0.5
    np.testing.assert_array_equal(op.matvec(v), before)


def test_linear_model_hessian_closed_form() -> None:
    """L = Σ ½‖Wx + b − y‖² / B: H = I_out ⊗ [[XᵀX/B, x̄], [x̄ᵀ, 1]] (W row-major, then b)."""
    rng = np.random.default_rng(4)
    n_in, n_out, B = 3, 2, 9
    model = MLP([n_in, n_out], dtype=np.float64, seed=0)
    x, y = rng.standard_normal((B, n_in)), rng.standard_normal((B, n_out))
    H = hessian_matrix(model, x, y, "mse")
    I = np.eye(n_out)
    nW = n_out * n_in
    ref = np.zeros_like(H)
    ref[:nW, :nW] = np.kron(I, x.T @ x / B)
    ref[:nW, nW:] = np.kron(I, x.mean(axis=0)[:, None])
    ref[nW:, :nW] = ref[:nW, nW:].T
    ref[nW:, nW:] = I
    np.testing.assert_allclose(H, ref, rtol=1e-13, atol=1e-15)


def test_explicit_hessian_of_a_tiny_network() -> None:
    """Every column against finite differences of the gradient; symmetric."""
    rng = np.random.default_rng(5)
    model = _model([3, 4, 2], "softplus")
    x, y = rng.standard_normal((6, 3)), rng.integers(0, 2, 6)
    H = hessian_matrix(model, x, y, "cross_entropy")
    n = model.params.size
    fd = np.column_stack([_fd_hvp(model, x, y, e, "cross_entropy") for e in np.eye(n)])
    assert _rel(H, fd) < 1e-8
    np.testing.assert_allclose(H, H.T, atol=1e-13)


def test_top_eigenvalue_matches_eigh() -> None:
    rng = np.random.default_rng(6)
    model = _model([3, 5, 1], "tanh")
    x, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 1))
    w = np.linalg.eigvalsh(hessian_matrix(model, x, y, "mse"))
    expected = w[np.argmax(np.abs(w))]
    got = top_eigenvalue(model, x, y, "mse", iters=2000, rng=np.random.default_rng(0), tol=1e-13)
    assert got == pytest.approx(expected, rel=1e-7)


def test_power_iteration_on_a_known_matrix() -> None:
    A = np.diag([1.0, -2.0, 5.0, 0.5])
    lam, v, k = power_iteration(lambda u: A @ u, 4, iters=500, rng=np.random.default_rng(1),
                                tol=1e-14)
    assert lam == pytest.approx(5.0, rel=1e-12)
    assert abs(v[2]) == pytest.approx(1.0, rel=1e-9)
    assert k < 500


def test_conjugate_gradient_solves_and_reports_negative_curvature() -> None:
    rng = np.random.default_rng(7)
    M = rng.standard_normal((6, 6))
    A = M @ M.T + 0.1 * np.eye(6)
    b = rng.standard_normal(6)
    p, Ap, info = conjugate_gradient(lambda u: A @ u, b, iters=50, tol=1e-12, damping=0.3)
    np.testing.assert_allclose(p, np.linalg.solve(A + 0.3 * np.eye(6), b), rtol=1e-9)
    np.testing.assert_allclose(Ap, (A + 0.3 * np.eye(6)) @ p, rtol=1e-9)
    assert not info["negative_curvature"]
    p, _, info = conjugate_gradient(lambda u: -u, b, iters=5)
    assert info["negative_curvature"] and np.array_equal(p, b)


def test_two_shards_summed_equal_the_full_batch_hvp() -> None:
    rng = np.random.default_rng(8)
    model = _model([4, 6, 3], "sigmoid")
    x, y = rng.standard_normal((10, 4)), rng.integers(0, 3, 10)
    v = rng.standard_normal(model.params.size)
    full = hvp(model, x, y, v, "cross_entropy")
    parts = hvp(model, x[:6], y[:6], v, "cross_entropy", denom=10) + hvp(
        model, x[6:], y[6:], v, "cross_entropy", denom=10)
    np.testing.assert_allclose(parts, full, rtol=1e-12, atol=1e-15)
    local = allreduce_hvp_(LocalComm(), model, x, y, v, denom=10, loss="cross_entropy")
    np.testing.assert_array_equal(local, full)


class _ThreadGroup:
    """In-process SUM allreduce among threads: the communicator protocol without MPI."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[np.ndarray | None] = [None] * size

    def comm(self, rank: int):
        group = self

        class _Comm:
            def allreduce_(self, buf: np.ndarray, op: str = "sum") -> np.ndarray:
                group.slots[rank] = buf.copy()
                group.barrier.wait()
                total = group.slots[0].copy()
                for s in group.slots[1:]:
                    total += s
                group.barrier.wait()  # all have read before any slot is overwritten
                buf[...] = total
                return buf

        c = _Comm()
        c.rank, c.size = rank, group.size
        return c


def _run_ranks(fn, size: int = 2) -> list:
    group = _ThreadGroup(size)
    with ThreadPoolExecutor(size) as pool:
        return [f.result() for f in [pool.submit(fn, r, group.comm(r)) for r in range(size)]]


def test_distributed_hvp_and_sharpness_equal_single_process() -> None:
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 2))
    v = rng.standard_normal(_model([3, 5, 2]).params.size)
    shards = [(x[:5], y[:5]), (x[5:], y[5:])]
    full_model = _model([3, 5, 2])
    full = hvp(full_model, x, y, v, "mse")
    lam_full = top_eigenvalue(full_model, x, y, "mse", iters=50, rng=np.random.default_rng(1))

    def rank(r, comm):
        m = _model([3, 5, 2])
        xs, ys = shards[r]
        hv = allreduce_hvp_(comm, m, xs, ys, v, denom=12, loss="mse")
        lam = top_eigenvalue(m, xs, ys, "mse", iters=50, rng=np.random.default_rng(1),
                             denom=12, comm=comm)
        return hv, lam

    for hv, lam in _run_ranks(rank):
        np.testing.assert_allclose(hv, full, rtol=1e-12, atol=1e-14)
        assert lam == pytest.approx(lam_full, rel=1e-10)


def test_newton_cg_solves_linear_least_squares_in_one_step() -> None:
    rng = np.random.default_rng(10)
    model = MLP([4, 2], dtype=np.float64, seed=0)
    x, y = rng.standard_normal((20, 4)), rng.standard_normal((20, 2))
    opt = NewtonCG(damping=1e-12, cg_iters=model.params.size, cg_tol=1e-14, adapt=False)
    info = opt.step_(model, x, y, "mse")
    assert info["accepted"]
    sol, *_ = np.linalg.lstsq(np.column_stack([x, np.ones(20)]), y, rcond=None)
    np.testing.assert_allclose(model.named_params()["dense0.W"], sol[:4].T, atol=1e-9)
    np.testing.assert_allclose(model.named_params()["dense0.b"], sol[4], atol=1e-9)


def test_newton_cg_never_increases_the_loss_and_makes_progress() -> None:
    rng = np.random.default_rng(11)
    model = _model([2, 8, 1], "tanh", seed=1)
    x = rng.uniform(-2, 2, (64, 2))
    y = np.sin(x[:, :1]) * np.cos(x[:, 1:])
    opt = NewtonCG(damping=1e-2, cg_iters=30)
    losses = [opt.step_(model, x, y, "mse") for _ in range(25)]
    seq = [losses[0]["loss"]] + [s["new_loss"] for s in losses]
    assert all(b <= a for a, b in zip(seq, seq[1:], strict=False))
    assert seq[-1] < 0.1 * seq[0]


def test_newton_cg_data_parallel_equals_full_batch() -> None:
    rng = np.random.default_rng(12)
    x = rng.uniform(-2, 2, (30, 2))
    y = np.tanh(x[:, :1] - x[:, 1:])
    full = _model([2, 4, 1], "tanh", seed=3)
    opt = NewtonCG(damping=1e-2, cg_iters=10)
    for _ in range(3):
        opt.step_(full, x, y, "mse")
    shards = [(x[:13], y[:13]), (x[13:], y[13:])]

    def rank(r, comm):
        m = _model([2, 4, 1], "tanh", seed=3)
        o = NewtonCG(damping=1e-2, cg_iters=10)
        for _ in range(3):
            o.step_(m, *shards[r], "mse", denom=30, comm=comm)
        return m.params.copy()

    p0, p1 = _run_ranks(rank)
    np.testing.assert_array_equal(p0, p1)  # ranks took identical steps
    np.testing.assert_allclose(p0, full.params, rtol=1e-9, atol=1e-12)


def test_bad_inputs_are_refused() -> None:
    model = _model([3, 4, 2])
    x, y = np.zeros((2, 3)), np.zeros((2, 2))
    with pytest.raises(ValueError, match="expected"):
        hvp(model, x, y, np.zeros(5), "mse")
    with pytest.raises(ValueError, match="global batch"):
        top_eigenvalue(model, x, y, "mse", comm=LocalComm())
