"""Label smoothing: loss and gradient against the textbook formula; ε = 0 bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.nn import MLP, gradcheck
from distbackprop.nn.losses import loss_and_grad, loss_value
from distbackprop.nn.remat import CheckpointedMLP


def _unsmoothed_reference(z, y, denom):
    """The cross-entropy arithmetic as it was before label smoothing, operation for operation."""
    out = np.empty_like(z)
    rows = np.arange(z.shape[0])
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)
    picked = out[rows, y]
    np.exp(out, out=out)
    s = out.sum(axis=1, keepdims=True)
    value = float(np.sum(np.log(s[:, 0]) - picked)) / denom
    out /= s
    out[rows, y] -= 1.0
    out *= 1.0 / denom
    return value, out


def _data(rows=11, classes=5, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, classes)) * scale, rng.integers(0, classes, rows)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_loss_and_gradient_match_the_textbook_formula(eps: float, dtype) -> None:
    z, y = _data()
    z = z.astype(dtype)
    C, denom = z.shape[1], 7.0
    t = (1 - eps) * np.eye(C)[y] + eps / C                     # smoothed targets
    z64 = z.astype(np.float64)
    logp = z64 - np.log(np.sum(np.exp(z64), axis=1, keepdims=True))   # log softmax (direct)
    expected_loss = float(-np.sum(t * logp)) / denom
    expected_grad = (np.exp(logp) - t) / denom
    out = np.empty_like(z)
    value = loss_and_grad("cross_entropy", z, y, denom, out, label_smoothing=eps)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert value == pytest.approx(expected_loss, rel=tol)
    np.testing.assert_allclose(out, expected_grad, rtol=tol * 10, atol=tol)
    assert loss_value("cross_entropy", z, y, denom, label_smoothing=eps) == value
    # the gradient rows sum to zero (Σ_c t_c = 1 = Σ_c p_c)
    np.testing.assert_allclose(out.sum(axis=1), 0.0, atol=tol)


def test_stable_for_large_logits() -> None:
    z = np.array([[1000.0, -1000.0, 0.0]])
    out = np.empty_like(z)
    v = loss_and_grad("cross_entropy", z, np.array([0]), 1.0, out, label_smoothing=0.1)
    assert np.isfinite(v) and np.all(np.isfinite(out))
    # −Σ t log p with p ≈ (1, 0, 0): the ε/3 mass on class 1 costs 2000 nats, on class 2 1000
    assert v == pytest.approx(0.1 / 3 * 2000 + 0.1 / 3 * 1000, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_zero_smoothing_is_bit_identical_to_plain_cross_entropy(dtype) -> None:
    z, y = _data(seed=3)
    z = z.astype(dtype)
    ref_value, ref_grad = _unsmoothed_reference(z, y, 9.0)
    for kwargs in ({}, {"label_smoothing": 0.0}, {"label_smoothing": 0}):
        out = np.empty_like(z)
        assert loss_and_grad("cross_entropy", z, y, 9.0, out, **kwargs) == ref_value
        np.testing.assert_array_equal(out, ref_grad)


def test_model_loss_and_grad_passes_smoothing_through_and_gradchecks() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    model = MLP([4, 6, 3], activation="tanh", dtype=np.float64, seed=0)
    plain = model.loss_and_grad(x, y, "cross_entropy")
    smooth = model.loss_and_grad(x, y, "cross_entropy", label_smoothing=0.2)
    assert smooth != plain
    g = model.grads.copy()
    c = CheckpointedMLP(model, every=1)
    assert c.loss_and_grad(x, y, "cross_entropy", label_smoothing=0.2) == smooth
    np.testing.assert_array_equal(model.grads, g)

    class Smoothed:  # gradcheck's view of the model: the smoothed loss
        def __init__(self, m):
            self.m = m

        def __getattr__(self, name):
            return getattr(self.m, name)

        def loss_and_grad(self, x, y, loss):
            return self.m.loss_and_grad(x, y, loss, label_smoothing=0.2)

    assert gradcheck(Smoothed(model), x, y, "cross_entropy").ok(1e-7)


RANGE = r"must be in \[0, 1\)"


@pytest.mark.parametrize("loss,eps,match", [("mse", 0.1, "only meaningful with cross_entropy"),
                                            ("bce", 0.1, "only meaningful with cross_entropy"),
                                            ("cross_entropy", 1.0, RANGE),
                                            ("cross_entropy", -0.1, RANGE),
                                            ("cross_entropy", float("nan"), RANGE)])
def test_bad_smoothing_is_refused_naming_the_field(loss, eps, match) -> None:
    z = np.zeros((2, 2))
    y = np.array([0, 1]) if loss == "cross_entropy" else np.zeros((2, 2))
    with pytest.raises(ValueError, match=f"label_smoothing: {match}"):
        loss_and_grad(loss, z, y, 2.0, np.empty_like(z), label_smoothing=eps)
