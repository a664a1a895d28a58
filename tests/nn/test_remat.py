"""Gradient checkpointing: gradients bit-for-bit equal to the plain path (float64 and float32,
every activation, every segment length), exact activation-byte accounting, real buffers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distbackprop.nn import ACTIVATIONS, MLP, gradcheck
from distbackprop.nn.remat import CheckpointedMLP, plain_workspace_bytes


def _data(rows: int, n_in: int, n_out: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, n_in)), rng.integers(0, n_out, rows)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gradients_are_bit_for_bit_the_plain_ones(activation: str, dtype) -> None:
    model = MLP([6] + [9] * 10 + [4], activation=activation, dtype=dtype, seed=2)
    x, y = _data(13, 6, 4)
    plain_loss = model.loss_and_grad(x, y, "cross_entropy", denom=20.0)
    plain = model.grads.copy()
    plain_order: list[str] = []
    model.loss_and_grad(x, y, "cross_entropy", denom=20.0, on_layer_done=plain_order.append)
    for every in (1, 2, 3, 4, 11, 50):
        model.grads[...] = np.nan
        c = CheckpointedMLP(model, every=every)
        order: list[str] = []
        value = c.loss_and_grad(x, y, "cross_entropy", denom=20.0, on_layer_done=order.append)
        assert value == plain_loss
        np.testing.assert_array_equal(model.grads, plain, err_msg=f"every={every}")
        assert order == plain_order


def test_checkpointed_model_passes_gradcheck() -> None:
    model = MLP([3, 5, 5, 5, 2], activation="tanh", dtype=np.float64, seed=0)
    x, y = _data(4, 3, 2)
    res = gradcheck(CheckpointedMLP(model, every=2), x, y, "cross_entropy")
    assert res.ok(1e-7), res


def test_forward_output_equals_the_plain_forward() -> None:
    model = MLP([5] + [7] * 6 + [3], activation="gelu", dtype=np.float64, seed=1)
    x, _ = _data(8, 5, 3)
    ref = model.forward(x).copy()
    model.release_()
    np.testing.assert_array_equal(CheckpointedMLP(model, every=3).forward(x), ref)


@pytest.mark.parametrize("every", [1, 2, 4, 5, 16])
def test_activation_bytes_are_exact(every: int) -> None:
    """relu, uniform width w: plain holds L inputs; checkpointing holds n = ⌈L/k⌉ after
    forward and at most n + k − 1 (one segment recomputed, its last output = c_{s+1})."""
    L, w, B = 16, 8, 5
    model = MLP([w] * L + [3], activation="relu", dtype=np.float32, seed=0)
    x = np.zeros((B, w), dtype=np.float32)
    one = B * w * 4
    model.forward(x)
    assert model.activation_bytes() == L * one
    model.release_()
    c = CheckpointedMLP(model, every=every)
    c.forward(x)
    n = math.ceil(L / every)
    assert c.activation_bytes() == n * one
    c.backward(np.ones((B, 3), dtype=np.float32))
    k_last = L - (n - 1) * every
    expected_peak = max(n + k_last - 1,                                  # last segment
                        max((s + 2 + every - 1 for s in range(n - 1)), default=0))
    assert c.peak_activation_bytes == expected_peak * one
    assert c.activation_bytes() == 0


def test_sixteen_layers_hold_at_least_three_times_less() -> None:
    model = MLP([64] * 16 + [10], activation="relu", dtype=np.float32, seed=0)
    x, y = _data(32, 64, 10)
    model.loss_and_grad(x, y, "cross_entropy")
    model.forward(x)
    plain_held = model.activation_bytes()
    model.release_()
    c = CheckpointedMLP(model, every=4)
    c.forward(x)
    assert plain_held >= 3 * c.activation_bytes()
    c.backward(np.zeros((32, 10), dtype=np.float32))
    assert plain_held > 2 * c.peak_activation_bytes
    # the wrapper's real buffers are smaller than the layers' own workspaces
    assert plain_workspace_bytes(model) > 3 * c.workspace_bytes()


def test_bad_structure_and_misuse_are_refused() -> None:
    model = MLP([3, 4, 2], seed=0)
    with pytest.raises(ValueError, match="every"):
        CheckpointedMLP(model, every=0)
    model.layers.insert(1, model.layers[0])
    with pytest.raises(TypeError, match="expected an activation at layer 1"):
        CheckpointedMLP(model)
    with pytest.raises(RuntimeError, match="backward without a forward"):
        CheckpointedMLP(MLP([3, 4, 2], seed=0)).backward(np.zeros((1, 2)))
