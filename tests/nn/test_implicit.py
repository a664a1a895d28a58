"""Implicit layer: the IFT gradient against float64 finite differences and against unrolled
backprop through the iterations at convergence; divergence is reported clearly."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.nn import gradcheck
from distbackprop.nn.implicit import FixedPointError, ImplicitModel


def _model(method: str = "fixed_point", seed: int = 1, **kw) -> ImplicitModel:
    m = ImplicitModel(3, 5, 2, dtype=np.float64, seed=seed, tol=1e-14,
                      backward_method=method, **kw)
    m.b[...] = 0.3 * np.random.default_rng(seed).standard_normal(5)
    return m


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((7, 3)), rng.standard_normal((7, 2))


def test_views_share_the_flat_buffers() -> None:
    m = _model()
    for name, view in m.named_params().items():
        assert np.shares_memory(view, m.params), name
    assert m.layer_slices()["readout"].stop == m.params.size


@pytest.mark.parametrize("method", ["fixed_point", "direct"])
def test_ift_gradient_matches_finite_differences(method: str) -> None:
    m = _model(method)
    x, y = _data()
    res = gradcheck(m, x, y, "mse")
    assert res.ok(1e-7), res


def test_the_solution_is_a_fixed_point() -> None:
    m = _model()
    x, _ = _data()
    z = m.solve(x)
    np.testing.assert_allclose(z, np.tanh(z @ m.W.T + x @ m.U.T + m.b), atol=1e-14)
    assert 1 < m.forward_iterations < 100 and m.forward_residual <= 1e-14


def test_ift_equals_unrolled_backprop_at_convergence() -> None:
    m = _model()
    x, y = _data(1)
    ift_loss = m.loss_and_grad(x, y, "mse", denom=10.0)
    ift = m.grads.copy()
    unrolled_loss = m.unrolled_loss_and_grad(x, y, iterations=m.forward_iterations + 40,
                                             loss="mse", denom=10.0)
    assert unrolled_loss == pytest.approx(ift_loss, rel=1e-13)
    np.testing.assert_allclose(m.grads, ift, rtol=1e-10, atol=1e-13)
    # a few iterations are not converged: the unrolled gradient is then different
    m.unrolled_loss_and_grad(x, y, iterations=3, loss="mse", denom=10.0)
    assert np.max(np.abs(m.grads - ift)) > 1e-4


def test_direct_and_fixed_point_adjoints_agree() -> None:
    x, y = _data(2)
    a, b = _model("fixed_point"), _model("direct")
    a.loss_and_grad(x, y, "mse")
    b.loss_and_grad(x, y, "mse")
    np.testing.assert_allclose(a.grads, b.grads, rtol=1e-11, atol=1e-14)
    assert a.backward_iterations > 1 and b.backward_iterations == 1


def test_input_gradient_matches_finite_differences() -> None:
    m = _model()
    x, y = _data(3)
    y_hat = m.forward(x)
    dx = m.backward(y_hat - y, need_dx=True)
    eps = 1e-6
    num = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + eps
        plus = 0.5 * float(np.sum((m.forward(x) - y) ** 2))
        x[idx] = old - eps
        minus = 0.5 * float(np.sum((m.forward(x) - y) ** 2))
        x[idx] = old
        num[idx] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(dx, num, rtol=1e-7, atol=1e-9)


def test_divergence_names_iterations_and_residual() -> None:
    m = _model(max_iter=50)
    m.W[...] = -3.0 * np.eye(5)  # f oscillates between two points: no fixed point reached
    x, y = _data()
    with pytest.raises(FixedPointError, match=r"after 50 iterations.*residual.*‖W‖₂ = 3") as e:
        m.loss_and_grad(x, y, "mse")
    assert e.value.iterations == 50 and e.value.residual > 1.0
    m.W[...] = np.nan
    with pytest.raises(FixedPointError, match="after 1 iterations") as e:
        m.forward(x)
    assert np.isnan(e.value.residual)


def test_adjoint_divergence_is_reported() -> None:
    m = _model(max_iter=3)
    m.tol = 1e-3  # the forward converges loosely in 3 iterations; the adjoint cannot
    m.W[...] = 0.0
    x, y = _data()
    m.forward(x)
    m.W[...] = 5.0 * np.eye(5)  # adjoint map v ← g + 5 d ⊙ v expands
    with pytest.raises(FixedPointError, match="implicit backward"):
        m.backward(np.ones((7, 2)))


def test_memory_does_not_grow_with_iterations() -> None:
    x, _ = _data()
    a = _model(contraction=0.1)
    b = _model(contraction=0.9)
    a.forward(x)
    b.forward(x)
    assert b.forward_iterations > 3 * a.forward_iterations
    assert a.activation_bytes() == b.activation_bytes() == x.nbytes + 7 * 5 * 8


def test_training_lowers_the_loss() -> None:
    from distbackprop.optim import make_optimizer

    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, (64, 2))
    y = np.sin(x[:, :1]) + 0.5 * x[:, 1:]
    m = ImplicitModel(2, 16, 1, seed=0, tol=1e-8)
    opt = make_optimizer("adam", m.params.size, np.float64)
    first = m.loss_and_grad(x, y, "mse")
    for _ in range(200):
        m.loss_and_grad(x, y, "mse")
        opt.step_(m.params, m.grads, 1e-2)
    assert m.loss_and_grad(x, y, "mse") < 0.1 * first


def test_projection_keeps_the_layer_contractive() -> None:
    m = _model()
    m.W[...] *= 4.0
    before = m.project_(0.9)
    assert before == pytest.approx(2.0)  # started at ‖W‖₂ = 0.5
    assert np.linalg.norm(m.W, 2) == pytest.approx(0.9)
    assert np.shares_memory(m.W, m.params)
    W = m.W.copy()
    assert m.project_(0.95) == pytest.approx(0.9) and np.array_equal(m.W, W)  # no-op inside


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_adjoint_accuracy_does_not_depend_on_the_gradient_scale() -> None:
    """The gradient of Σ ℓ / denom shrinks with denom; the adjoint's relative stopping rule
    keeps its relative error against the direct solve the same at every scale (an absolute
    rule let it grow from 1e-11 to 3e-4 at denom 1e8)."""
    x, y = _data(4)
    errors, iters = [], []
    for denom in (1.0, 1e3, 1e6, 1e8):
        a = ImplicitModel(3, 5, 2, seed=1, tol=1e-10)
        b = ImplicitModel(3, 5, 2, seed=1, tol=1e-10, backward_method="direct")
        a.loss_and_grad(x, y, "mse", denom=denom)
        b.loss_and_grad(x, y, "mse", denom=denom)
        assert np.max(np.abs(b.grads)) < 10.0 / denom  # the scale really changes
        errors.append(_rel_err(a.grads, b.grads))
        iters.append(a.backward_iterations)
    assert max(errors) < 1e-9, errors
    assert max(errors) < 10 * min(errors) + 1e-15, errors  # same order at all four
    assert len(set(iters)) == 1, iters


def test_adjoint_tol_is_its_own_parameter() -> None:
    x, y = _data(5)
    ref = ImplicitModel(3, 5, 2, seed=1, tol=1e-12, backward_method="direct")
    ref.loss_and_grad(x, y, "mse", denom=1e6)
    found = {}
    for adjoint_tol in (1e-4, 1e-8, 1e-12):
        m = ImplicitModel(3, 5, 2, seed=1, tol=1e-12, adjoint_tol=adjoint_tol)
        assert m.adjoint_tol == adjoint_tol
        m.loss_and_grad(x, y, "mse", denom=1e6)
        found[adjoint_tol] = (m.backward_iterations, _rel_err(m.grads, ref.grads))
    assert found[1e-4][0] < found[1e-8][0] < found[1e-12][0]
    for adjoint_tol, (_, err) in found.items():
        assert err < 100 * adjoint_tol, found
    assert ImplicitModel(3, 5, 2, tol=1e-9).adjoint_tol == 1e-9  # default: the forward's tol


def test_zero_upstream_gradient_gives_zero_without_iterating() -> None:
    m = _model()
    x, _ = _data()
    m.forward(x)
    m.backward(np.zeros((7, 2)))
    assert m.backward_iterations == 0 and not np.any(m.grads[: m.layer_slices()["readout"].start])
