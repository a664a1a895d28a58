"""MAML meta-gradients through k inner SGD steps, against float64 finite differences of the
outer loss with respect to the initial parameters."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.nn import MLP
from distbackprop.nn.meta import (
    adapt_,
    adapted_loss,
    maml_loss_and_grad,
    maml_task_loss_and_grad,
    sine_tasks,
)
from distbackprop.optim import make_optimizer


def _setup(seed: int = 0, activation: str = "tanh"):
    model = MLP([1, 6, 6, 1], activation=activation, dtype=np.float64, seed=seed + 1)
    tasks = sine_tasks(np.random.default_rng(seed), 3, n_support=5, n_query=6)
    return model, tasks


def _fd_outer(model, tasks, lr, steps, eps=1e-6) -> np.ndarray:
    p = model.params
    out = np.empty_like(p)
    for i in range(p.size):
        old = p[i]
        p[i] = old + eps
        plus = maml_loss_and_grad(model, tasks, lr, steps)
        p[i] = old - eps
        minus = maml_loss_and_grad(model, tasks, lr, steps)
        p[i] = old
        out[i] = (plus - minus) / (2 * eps)
    return out


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(a) + np.linalg.norm(b)))


@pytest.mark.parametrize("activation,steps", [("tanh", 3), ("softplus", 2), ("gelu", 1)])
def test_meta_gradient_matches_finite_differences(activation: str, steps: int) -> None:
    model, tasks = _setup(activation=activation)
    maml_loss_and_grad(model, tasks, inner_lr=0.05, inner_steps=steps)
    analytic = model.grads.copy()
    assert _rel(analytic, _fd_outer(model, tasks, 0.05, steps)) < 1e-7


def test_first_order_drops_the_hessian_terms() -> None:
    model, tasks = _setup()
    maml_loss_and_grad(model, tasks, 0.05, 3, first_order=True)
    fo = model.grads.copy()
    assert _rel(fo, _fd_outer(model, tasks, 0.05, 3)) > 1e-3
    # first order = mean over tasks of ∇L_q at the adapted parameters
    ref = np.zeros_like(fo)
    theta0 = model.params.copy()
    for t in tasks:
        adapt_(model, t.x_support, t.y_support, 0.05, 3)
        model.loss_and_grad(t.x_query, t.y_query, "mse")
        ref += model.grads / len(tasks)
        model.params[...] = theta0
    np.testing.assert_allclose(fo, ref, rtol=1e-12)


def test_zero_inner_steps_is_the_plain_query_gradient() -> None:
    model, tasks = _setup()
    value, g = maml_task_loss_and_grad(model, tasks[0], 0.05, 0)
    ref = model.loss_and_grad(tasks[0].x_query, tasks[0].y_query, "mse")
    assert value == ref
    np.testing.assert_array_equal(g, model.grads)


def test_parameters_are_restored_and_denominator_sums_across_workers() -> None:
    model, tasks = _setup()
    theta0 = model.params.copy()
    full = maml_loss_and_grad(model, tasks, 0.05, 2)
    g_full = model.grads.copy()
    np.testing.assert_array_equal(model.params, theta0)
    a = maml_loss_and_grad(model, tasks[:1], 0.05, 2, denom=3)
    g = model.grads.copy()
    b = maml_loss_and_grad(model, tasks[1:], 0.05, 2, denom=3)
    assert a + b == pytest.approx(full, rel=1e-13)
    np.testing.assert_allclose(g + model.grads, g_full, rtol=1e-12, atol=1e-15)


def test_meta_training_beats_the_initialisation_after_adaptation() -> None:
    model = MLP([1, 20, 20, 1], activation="tanh", dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    held_out = sine_tasks(np.random.default_rng(123), 20, n_support=10, n_query=20)

    def score() -> float:
        return float(np.mean([adapted_loss(model, t, 0.02, 2) for t in held_out]))

    before = score()
    opt = make_optimizer("adam", model.params.size, np.float64)
    for _ in range(200):
        maml_loss_and_grad(model, sine_tasks(rng, 4, 10, 10), 0.02, 2)
        opt.step_(model.params, model.grads, 1e-2)
    assert score() < 0.6 * before
