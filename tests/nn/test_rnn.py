"""BPTT: full BPTT against float64 finite differences; truncated BPTT against its definition
(the graph cut every k steps = chunkwise gradients from carried, non-differentiated states);
per-time-step gradient norms and their buckets; training on the sine forecast."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.nn import gradcheck
from distbackprop.nn.rnn import RNN, bucket_time_norms, sine_forecast_batch
from distbackprop.optim import make_optimizer


def _rnn(seed: int = 1, gain: float = 0.9) -> RNN:
    m = RNN(2, 4, 3, dtype=np.float64, seed=seed, recurrent_gain=gain)
    m.b[...] = 0.2 * np.random.default_rng(seed).standard_normal(4)
    return m


def _fd(f, params: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    out = np.empty_like(params)
    for i in range(params.size):
        old = params[i]
        params[i] = old + eps
        plus = f()
        params[i] = old - eps
        minus = f()
        params[i] = old
        out[i] = (plus - minus) / (2 * eps)
    return out


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(a) + np.linalg.norm(b)))


def test_views_share_the_flat_buffers() -> None:
    m = _rnn()
    for name, view in m.named_params().items():
        assert np.shares_memory(view, m.params), name
    for name, view in m.named_grads().items():
        assert np.shares_memory(view, m.grads), name
    sl = m.layer_slices()
    assert sl["rnn"].stop == sl["readout"].start and sl["readout"].stop == m.params.size


def test_full_bptt_matches_finite_differences_every_step_mse() -> None:
    rng = np.random.default_rng(0)
    m = _rnn()
    x, y = rng.standard_normal((3, 6, 2)), rng.standard_normal((3, 6, 3))
    res = gradcheck(m, x, y, "mse")
    assert res.ok(1e-7), res


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_full_bptt_matches_finite_differences_last_step_with_h0(loss: str) -> None:
    rng = np.random.default_rng(1)
    m = _rnn(seed=2)
    x = rng.standard_normal((4, 7, 2))
    h0 = 0.5 * rng.standard_normal((4, 4))
    y = rng.integers(0, 3, 4) if loss == "cross_entropy" else rng.standard_normal((4, 3))
    m.loss_and_grad(x, y, loss, denom=5.0, last_only=True, h0=h0)
    analytic = m.grads.copy()
    numeric = _fd(lambda: m.loss_and_grad(x, y, loss, denom=5.0, last_only=True, h0=h0),
                  m.params)
    assert _rel(analytic, numeric) < 1e-7


def test_gradient_wrt_h0_matches_finite_differences() -> None:
    rng = np.random.default_rng(2)
    m = _rnn()
    x, y = rng.standard_normal((2, 5, 2)), rng.standard_normal((2, 5, 3))
    h0 = 0.3 * rng.standard_normal((2, 4))
    y_hat = m.forward(x, h0)
    dh0 = m.backward(y_hat - y)  # ∂/∂ŷ of ½‖ŷ − y‖² summed
    numeric = _fd(lambda: 0.5 * float(np.sum((m.forward(x, h0) - y) ** 2)), h0.reshape(-1))
    np.testing.assert_allclose(dh0.reshape(-1), numeric, rtol=1e-7, atol=1e-9)


def _chunked(m: RNN, x, y, k: int, denom: float):
    """The definition: run the full forward, then chunk by chunk from the carried (constant)
    state h_{jk}, take each chunk's exact gradient, and sum."""
    T = x.shape[1]
    m.forward(x)
    states = m._H.copy()
    m.release_()
    total_loss, total_grad = 0.0, np.zeros_like(m.params)
    for j in range(0, T, k):
        sl = slice(j, min(j + k, T))
        total_loss += m.loss_and_grad(x[:, sl], y[:, sl], "mse", denom=denom, h0=states[j])
        total_grad += m.grads
    return total_loss, total_grad, states


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_truncated_bptt_equals_the_cut_graph_gradient(k: int) -> None:
    rng = np.random.default_rng(3)
    m = _rnn()
    B, T = 3, 10
    x, y = rng.standard_normal((B, T, 2)), rng.standard_normal((B, T, 3))
    value = m.loss_and_grad(x, y, "mse", truncate=k)
    truncated = m.grads.copy()
    ref_loss, ref_grad, states = _chunked(m, x, y, k, denom=B * T)
    assert value == pytest.approx(ref_loss, rel=1e-13)
    np.testing.assert_allclose(truncated, ref_grad, rtol=1e-11, atol=1e-14)

    # and by finite differences of the cut loss (states h_{jk} frozen at their values)
    def cut_loss() -> float:
        total = 0.0
        for j in range(0, T, k):
            sl = slice(j, min(j + k, T))
            y_hat = m.forward(x[:, sl], states[j])
            total += 0.5 * float(np.sum((y_hat - y[:, sl]) ** 2)) / (B * T)
        m.release_()
        return total

    assert _rel(truncated, _fd(cut_loss, m.params)) < 1e-7
    full = (m.loss_and_grad(x, y, "mse"), m.grads.copy())[1]
    if k < T:
        assert _rel(truncated, full) > 1e-4  # truncation really drops terms


def test_truncation_longer_than_the_sequence_is_full_bptt() -> None:
    rng = np.random.default_rng(4)
    m = _rnn()
    x, y = rng.standard_normal((2, 6, 2)), rng.standard_normal((2, 6, 3))
    m.loss_and_grad(x, y, "mse")
    full = m.grads.copy()
    m.loss_and_grad(x, y, "mse", truncate=6)
    np.testing.assert_array_equal(m.grads, full)
    with pytest.raises(ValueError, match="truncate"):
        m.loss_and_grad(x, y, "mse", truncate=0)


def test_shards_with_global_denominator_sum_to_the_full_batch() -> None:
    rng = np.random.default_rng(5)
    m = _rnn()
    x, y = rng.standard_normal((5, 4, 2)), rng.standard_normal((5, 4, 3))
    full = m.loss_and_grad(x, y, "mse")
    g_full = m.grads.copy()
    a = m.loss_and_grad(x[:2], y[:2], "mse", denom=5 * 4)
    g = m.grads.copy()
    b = m.loss_and_grad(x[2:], y[2:], "mse", denom=5 * 4)
    g += m.grads
    assert a + b == pytest.approx(full, rel=1e-13)
    np.testing.assert_allclose(g, g_full, rtol=1e-12, atol=1e-15)


def test_time_grad_norms_show_vanishing_and_are_bucketed() -> None:
    rng = np.random.default_rng(6)
    m = RNN(1, 8, 1, seed=0, recurrent_gain=0.5)
    T = 24
    x, y = rng.standard_normal((4, T, 1)), rng.standard_normal((4, 1))
    m.loss_and_grad(x, y, "mse", last_only=True)
    n = m.time_grad_norms
    assert n.shape == (T,) and np.all(n > 0)
    assert n[0] < 1e-3 * n[-1]  # a contraction of 0.5 per step: gone after ~10 steps
    buckets = bucket_time_norms(n, buckets=4)
    assert list(buckets) == ["t1-6", "t7-12", "t13-18", "t19-24"]
    assert buckets["t19-24"] == pytest.approx(float(np.sqrt(np.mean(n[18:] ** 2))))
    vals = list(buckets.values())
    assert vals == sorted(vals)
    # truncation zeroes what flows past a cut
    m.loss_and_grad(x, y, "mse", last_only=True, truncate=5)
    assert np.all(m.time_grad_norms[:20] == 0) and np.all(m.time_grad_norms[20:] > 0)
    assert len(bucket_time_norms(np.ones(3), buckets=8)) == 3


def test_activation_bytes_are_exact_and_released() -> None:
    m = RNN(3, 5, 2, dtype=np.float32)
    m.forward(np.zeros((4, 7, 3)))
    assert m.activation_bytes() == 4 * (7 * 4 * 3 + 8 * 4 * 5)
    m.backward(np.zeros((4, 7, 2), dtype=np.float32))
    assert m.activation_bytes() == 0
    with pytest.raises(RuntimeError, match="backward without a forward"):
        m.backward(np.zeros((4, 7, 2)))


def test_training_on_the_sine_forecast_lowers_the_loss() -> None:
    rng = np.random.default_rng(7)
    m = RNN(1, 16, 1, seed=0)
    opt = make_optimizer("adam", m.params.size, np.float64)
    x_val, y_val = sine_forecast_batch(np.random.default_rng(99), 32, 30)
    before = m.loss_and_grad(x_val, y_val, "mse")
    for _ in range(150):
        x, y = sine_forecast_batch(rng, 16, 30)
        m.loss_and_grad(x, y, "mse", truncate=10)
        opt.step_(m.params, m.grads, 1e-2)
    after = m.loss_and_grad(x_val, y_val, "mse")
    assert after < 0.2 * before
