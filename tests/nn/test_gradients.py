"""Gradients: finite differences (float64), the seed's closed forms, and explicit Jacobians."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from distbackprop.nn import ACTIVATIONS, MLP, gradcheck, local_jacobian
from distbackprop.nn.layers import Dense, make_activation
from distbackprop.nn.losses import loss_and_grad

LOSS_CASES = [("mse", 3), ("cross_entropy", 4), ("bce", 2)]


def _targets(loss: str, n_out: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    if loss == "mse":
        return rng.standard_normal((rows, n_out))
    if loss == "cross_entropy":
        return rng.integers(0, n_out, rows)
    return rng.integers(0, 2, (rows, n_out)).astype(np.float64)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss,n_out", LOSS_CASES)
def test_gradcheck_every_layer_and_loss(activation: str, loss: str, n_out: int) -> None:
    rng = np.random.default_rng(7)
    model = MLP([5, 7, 6, n_out], activation=activation, dtype=np.float64, seed=3)
    x = rng.standard_normal((9, 5))
    y = _targets(loss, n_out, 9, rng)
    res = gradcheck(model, x, y, loss)
    assert res.n_checked == model.params.size
    assert res.rel_error < 1e-6, res
    assert all(e < 1e-6 for e in res.per_param.values()), res.per_param


def test_gradcheck_detects_a_wrong_gradient(monkeypatch) -> None:
    """The checker itself must be able to fail: break ReLU's derivative and see it."""
    from distbackprop.nn import layers

    def wrong(self, h, dh, dz):
        np.copyto(dz, dh)  # pretends σ′ = 1 everywhere

    monkeypatch.setattr(layers.ReLU, "grad_", wrong)
    rng = np.random.default_rng(0)
    model = MLP([4, 8, 3], activation="relu", dtype=np.float64, seed=0)
    res = gradcheck(model, rng.standard_normal((6, 4)), rng.integers(0, 3, 6), "cross_entropy")
    assert not res.ok()


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_seed_two_layer_network_closed_forms() -> None:
    """z = Wx + b, h = σ(z), ŷ = Uh + c, L = ½‖ŷ − y‖²: every gradient as the seed writes it."""
    W = np.array([[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6]])
    b = np.array([0.01, -0.02, 0.03])
    U = np.array([[0.7, -0.8, 0.9]])
    c = np.array([0.05])
    x = np.array([1.0, 2.0])
    y = np.array([0.5])

    model = MLP([2, 3, 1], activation="sigmoid", dtype=np.float64, seed=0)
    p = model.named_params()
    p["dense0.W"][...] = W
    p["dense0.b"][...] = b
    p["dense1.W"][...] = U
    p["dense1.b"][...] = c
    loss = model.loss_and_grad(x[None, :], y[None, :], "mse")

    # the seed's closed forms, computed separately
    z = W @ x + b
    h = _sigmoid(z)
    y_hat = U @ h + c
    e = y_hat - y
    assert loss == pytest.approx(0.5 * float(e @ e), rel=1e-14)
    dU = np.outer(e, h)                      # (ŷ − y) hᵀ
    dc = e                                   # ŷ − y
    delta = (U.T @ e) * h * (1 - h)          # Uᵀ(ŷ − y) ⊙ σ′(z)
    dW = np.outer(delta, x)                  # … xᵀ
    db = delta
    g = model.named_grads()
    np.testing.assert_allclose(g["dense1.W"], dU, rtol=1e-14)
    np.testing.assert_allclose(g["dense1.b"], dc, rtol=1e-14)
    np.testing.assert_allclose(g["dense0.W"], dW, rtol=1e-13)
    np.testing.assert_allclose(g["dense0.b"], db, rtol=1e-13)
    # hand-computed numbers for the record (z = [-0.29, 1.08, 0.73])
    np.testing.assert_allclose(z, [-0.29, 1.08, 0.73], rtol=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_backward_is_vjp_with_local_jacobian(activation: str) -> None:
    rng = np.random.default_rng(1)
    act = make_activation(activation, dtype=np.float64)
    z = rng.standard_normal(6) * 2
    v = rng.standard_normal(6)
    act.forward(z[None, :])
    vjp = act.backward(v[None, :])[0]
    J = local_jacobian(act, z)
    np.testing.assert_allclose(vjp, v @ J, rtol=1e-12, atol=1e-14)
    # ∂h/∂z = diag(σ′(z)): off-diagonal exactly zero
    assert np.count_nonzero(J - np.diag(np.diag(J))) == 0


def test_dense_jacobians() -> None:
    rng = np.random.default_rng(2)
    W = rng.standard_normal((3, 4))
    b = rng.standard_normal(3)
    dW, db = np.zeros_like(W), np.zeros_like(b)
    layer = Dense("d", W, b, dW, db)
    x = rng.standard_normal(4)
    v = rng.standard_normal(3)
    layer.forward(x[None, :])
    dx = layer.backward(v[None, :])[0]
    np.testing.assert_allclose(local_jacobian(layer, x), W)              # ∂ŷ/∂h = U
    np.testing.assert_allclose(dx, v @ local_jacobian(layer, x), rtol=1e-13)
    np.testing.assert_allclose(dW.ravel(), v @ local_jacobian(layer, x, "W"), rtol=1e-13)
    np.testing.assert_allclose(db, v @ local_jacobian(layer, x, "b"), rtol=1e-13)


def test_named_views_share_memory_with_flat_buffers() -> None:
    model = MLP([4, 5, 3], dtype=np.float32, seed=0)
    for name, view in model.named_params().items():
        assert np.shares_memory(view, model.params), name
    for name, view in model.named_grads().items():
        assert np.shares_memory(view, model.grads), name
    assert list(model.named_params()) == ["dense0.W", "dense0.b", "dense1.W", "dense1.b"]
    assert model.named_params()["dense0.W"].shape == (5, 4)
    # a write through the flat buffer is seen by the layer
    model.params[:] = 0
    assert float(np.abs(model.dense_layers[0].W).sum()) == 0.0


def test_backward_writes_the_views_it_was_built_on() -> None:
    rng = np.random.default_rng(0)
    model = MLP([4, 5, 3], dtype=np.float64, seed=0)
    model.loss_and_grad(rng.standard_normal((3, 4)), np.array([0, 1, 2]), "cross_entropy")
    flat = np.concatenate([g.ravel() for g in model.named_grads().values()])
    np.testing.assert_array_equal(flat, model.grads)
    assert np.abs(model.grads).sum() > 0


def test_losses_are_stable_for_large_logits() -> None:
    z = np.array([[1000.0, -1000.0, 0.0]])
    out = np.empty_like(z)
    v = loss_and_grad("cross_entropy", z, np.array([0]), 1.0, out)
    assert np.isfinite(v) and np.all(np.isfinite(out))
    v = loss_and_grad("bce", z, np.array([[1.0, 0.0, 1.0]]), 1.0, out)
    assert np.isfinite(v) and v == pytest.approx(np.log(2.0))
    for name in ("sigmoid", "softplus"):
        act = make_activation(name, dtype=np.float64)
        h = act.forward(np.array([[-1000.0, 1000.0]]))
        assert np.all(np.isfinite(h)), name


def test_activation_cache_is_released_and_counted() -> None:
    rng = np.random.default_rng(0)
    model = MLP([8, 16, 16, 4], dtype=np.float64, seed=0)
    x = rng.standard_normal((5, 8))
    model.forward(x)
    # cached: x (5×8), h0 (5×16), h1 (5×16) for the Dense layers; ReLU caches h (same arrays)
    expected = x.nbytes + 2 * 5 * 16 * 8
    assert model.activation_bytes() == expected
    model.backward(np.ones((5, 4)))
    assert model.activation_bytes() == 0


def test_no_allocation_growth_in_steady_state() -> None:
    import tracemalloc
    rng = np.random.default_rng(0)
    model = MLP([32, 64, 10], dtype=np.float32, seed=0)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    for _ in range(3):
        model.loss_and_grad(x, y, "cross_entropy")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(50):
        model.loss_and_grad(x, y, "cross_entropy")
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 4096, grown


def test_float32_and_float64_start_from_the_same_numbers() -> None:
    a = MLP([6, 5, 2], dtype=np.float32, seed=4)
    b = MLP([6, 5, 2], dtype=np.float64, seed=4)
    np.testing.assert_allclose(a.params, b.params.astype(np.float32))
    assert a.params.dtype == np.float32 and b.params.dtype == np.float64


@pytest.mark.parametrize("init,expected_std", [("he", np.sqrt(2 / 400)),
                                               ("xavier", np.sqrt(2 / 600)),
                                               ("normal", 0.01)])
def test_initializers(init: str, expected_std: float) -> None:
    m = MLP([400, 200], dtype=np.float64, seed=0, init=init)
    W = m.named_params()["dense0.W"]
    assert W.std() == pytest.approx(expected_std, rel=0.02)
    assert np.all(m.named_params()["dense0.b"] == 0)


def test_nn_imports_no_runtime_dependencies() -> None:
    code = ("import sys, distbackprop.nn; bad = [m for m in ('ray', 'mpi4py', 'pyarrow', "
            "'distbackprop.comm', 'distbackprop.runtime', 'prometheus_client') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_save_and_load_round_trip(tmp_path) -> None:
    from distbackprop.nn import load_model
    m = MLP([4, 6, 3], activation="tanh", dtype=np.float32, seed=2)
    m.save(tmp_path / "m.npz", meta={"task": "classification", "classes": [0, 1, 2]})
    m2 = load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(m.params, m2.params)
    assert m2.activation == "tanh" and m2.dtype == np.float32
    assert m2.meta["classes"] == [0, 1, 2]
