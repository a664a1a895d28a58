"""The activation protocol, the subgradient convention at every kink, the straight-through
estimators (sign, round) beside hardtanh, and gradcheck's report of kink-crossing stencils."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

from distbackprop.nn import MLP, gradcheck
from distbackprop.nn import hessian as hessian_mod
from distbackprop.nn import remat as remat_mod
from distbackprop.nn.hessian import HessianOperator
from distbackprop.nn.layers import ACTIVATIONS, STRAIGHT_THROUGH, Activation, make_activation
from distbackprop.nn.remat import CheckpointedMLP

ALL = sorted([*ACTIVATIONS, *STRAIGHT_THROUGH])


def _act(name: str, bits: int = 3) -> Activation:
    return make_activation(name, quantize_bits=bits if name == "round" else None)


# the protocol ------------------------------------------------------------------------------
def test_remat_and_hessian_use_only_the_public_protocol() -> None:
    for mod in (remat_mod, hessian_mod):
        src = inspect.getsource(mod)
        assert not re.search(r"\.(_apply|_grad|_ws|_C|_A)\b", src), mod.__name__
        concrete = {type(_act(n)).__name__ for n in ALL}
        # no per-class ladder: the modules never name a concrete activation class
        assert not concrete & set(re.findall(r"\b[A-Z]\w+\b", src)), mod.__name__


@pytest.mark.parametrize("name", ALL)
def test_every_activation_carries_value_and_derivatives(name: str) -> None:
    act = _act(name)
    cls = type(act)
    for method in ("apply_", "grad_"):
        assert getattr(cls, method) is not getattr(Activation, method), (name, method)
    z = np.linspace(-3, 3, 13)[None, :]
    h = np.empty_like(z)
    act.apply_(z, h)
    np.testing.assert_array_equal(act.forward(z), h)
    dz = act.backward(np.ones_like(z))
    np.testing.assert_array_equal(dz, act.derivative(z))
    d2 = act.second(z)
    assert d2 is None or d2.shape == z.shape
    assert act.workspace_bytes() > 0


# subgradient conventions: the documented value of the backward at every kink --------------
# activation → {kink: σ′ (or the STE's surrogate) there}; the README table says the same.
CONVENTIONS: dict[str, dict[float, float]] = {
    "identity": {},
    "sigmoid": {},
    "tanh": {},
    "softplus": {},
    "gelu": {},
    "relu": {0.0: 0.0},
    "leaky_relu": {0.0: 0.01},
    "hardtanh": {-1.0: 1.0, 1.0: 1.0},
    "sign": {-1.0: 1.0, 0.0: 1.0, 1.0: 1.0},
    # K bits: the window's edges ±1 and the 2ᴷ − 1 jumps between levels (K = 2: −1/3, 1/3…)
    "round": {},  # filled per K by _round_conventions
}


def _round_conventions(bits: int) -> dict[float, float]:
    steps = 2**bits - 1
    jumps = {-1.0 + (2 * j + 1) / steps: 1.0 for j in range(steps)}
    return {-1.0: 1.0, 1.0: 1.0, **jumps}


def test_conventions_cover_every_activation() -> None:
    assert sorted(CONVENTIONS) == ALL


@pytest.mark.parametrize("name", ALL)
def test_backward_exactly_at_the_kinks_is_the_documented_value(name: str) -> None:
    for bits in ((1, 2, 3, 8) if name == "round" else (None,)):
        act = make_activation(name, quantize_bits=bits)
        table = _round_conventions(bits) if name == "round" else CONVENTIONS[name]
        assert sorted(act.kinks) == pytest.approx(sorted(table)), (name, bits)
        if not table:
            continue
        z = np.array([sorted(table)])
        act.forward(z)
        dh = np.full_like(z, 3.0)
        got = act.backward(dh)
        expected = 3.0 * np.array([table[k] for k in sorted(table)])
        np.testing.assert_array_equal(got[0], expected, err_msg=f"{name} K={bits}")
        np.testing.assert_array_equal(act.derivative(z)[0], expected / 3.0)


def test_relu_and_leaky_relu_at_zero_from_both_signs_of_zero() -> None:
    z = np.array([[0.0, -0.0]])
    assert np.array_equal(make_activation("relu").derivative(z), [[0.0, 0.0]])
    assert np.array_equal(make_activation("leaky_relu").derivative(z), [[0.01, 0.01]])


# the straight-through estimators ------------------------------------------------------------
def _surrogate(z: np.ndarray, dh: np.ndarray) -> np.ndarray:
    """dh ⊙ 1{|z| ≤ 1}, written independently of the engine."""
    return np.where((z >= -1.0) & (z <= 1.0), dh, 0.0)


def _random_z_with_edges(rng: np.random.Generator) -> np.ndarray:
    z = rng.uniform(-2.5, 2.5, (16, 12))
    z.flat[:7] = [-1.0, 1.0, 0.0, -0.0, np.nextafter(1.0, 2), np.nextafter(-1.0, -2), 2.0]
    return z


@pytest.mark.parametrize("name,bits", [("sign", None), ("hardtanh", None), ("round", 1),
                                       ("round", 2), ("round", 4), ("round", 16)])
def test_ste_backward_is_the_documented_surrogate(name: str, bits: int | None) -> None:
    rng = np.random.default_rng(0)
    z = _random_z_with_edges(rng)
    dh = rng.standard_normal(z.shape)
    act = make_activation(name, quantize_bits=bits)
    act.forward(z)
    np.testing.assert_array_equal(act.backward(dh), _surrogate(z, dh))
    assert act.second(z) is None  # σ″ = 0


def test_sign_forward() -> None:
    z = np.array([[-2.0, -1e-300, -0.0, 0.0, 1e-300, 3.0, np.nan]])
    h = make_activation("sign").forward(z)
    np.testing.assert_array_equal(h[0, :6], [-1, -1, 1, 1, 1, 1])
    assert np.isnan(h[0, 6])


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_round_forward_levels(bits: int) -> None:
    n = 2**bits
    z = np.linspace(-1.5, 1.5, 4001)[None, :]
    h = make_activation("round", quantize_bits=bits).forward(z)[0]
    levels = -1.0 + 2.0 * np.arange(n) / (n - 1)
    assert np.all(np.min(np.abs(h[:, None] - levels[None, :]), axis=1) < 1e-12)
    assert len(np.unique(h)) == n          # every level is reached
    assert np.all(np.diff(h) >= 0)         # monotone
    zc = np.clip(z[0], -1, 1)
    assert np.max(np.abs(h - zc)) <= 1.0 / (n - 1) + 1e-12  # within half a step


def test_round_with_one_bit_is_sign() -> None:
    rng = np.random.default_rng(1)
    z = _random_z_with_edges(rng)
    np.testing.assert_array_equal(make_activation("round", quantize_bits=1).forward(z),
                                  make_activation("sign").forward(z))


def test_quantize_bits_is_required_by_round_only() -> None:
    with pytest.raises(ValueError, match="quantize_bits: required"):
        make_activation("round")
    with pytest.raises(ValueError, match="quantize_bits: only meaningful"):
        make_activation("relu", quantize_bits=4)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ValueError, match="quantize_bits: must be an integer in 1..16"):
            make_activation("round", quantize_bits=bad)
    with pytest.raises(ValueError, match="quantize_bits"):
        MLP([3, 4, 2], activation="round")


def test_hardtanh_gradcheck_passes_with_saturated_units() -> None:
    rng = np.random.default_rng(3)
    model = MLP([4, 8, 8, 3], activation="hardtanh", dtype=np.float64, seed=1, init_scale=2.0)
    x = rng.standard_normal((10, 4))
    y = rng.integers(0, 3, 10)
    model.forward(x)
    z = model.layers[0].forward(x)
    assert np.any(np.abs(z) > 1) and np.any(np.abs(z) < 1)  # both sides of the window
    model.release_()
    res = gradcheck(model, x, y, "cross_entropy")
    assert res.ok(1e-7), res


def _pair(name_a: str, name_b: str, seed: int = 0, bits: int | None = None):
    a = MLP([5, 9, 3], activation=name_a, dtype=np.float64, seed=seed,
            quantize_bits=bits if name_a == "round" else None)
    b = MLP([5, 9, 3], activation=name_b, dtype=np.float64, seed=seed,
            quantize_bits=bits if name_b == "round" else None)
    np.testing.assert_array_equal(a.params, b.params)
    return a, b


@pytest.mark.parametrize("ste,bits", [("sign", None), ("round", 2)])
def test_ste_gradient_equals_hardtanh_gradient_at_the_same_preactivations(ste, bits) -> None:
    """The defining property: the same upstream gradient dy reaches the first layer through
    the STE exactly as through hardtanh (the hidden pre-activations are the same)."""
    rng = np.random.default_rng(2)
    a, b = _pair(ste, "hardtanh", bits=bits)
    x = rng.standard_normal((12, 5)) * 1.5
    x[0] = 0.0  # a row whose pre-activations are exactly b = 0: sign's jump, hardtanh's middle
    dy = rng.standard_normal((12, 3))
    a.forward(x)
    a.backward(dy)
    b.forward(x)
    b.backward(dy)
    z = x @ a.named_params()["dense0.W"].T
    assert np.any(np.abs(z) > 1) and np.any(np.abs(z) < 1)
    np.testing.assert_array_equal(a.named_grads()["dense0.W"], b.named_grads()["dense0.W"])
    np.testing.assert_array_equal(a.named_grads()["dense0.b"], b.named_grads()["dense0.b"])
    # the output layer sees the STE's own (quantized) outputs, so it differs
    assert not np.array_equal(a.named_grads()["dense1.W"], b.named_grads()["dense1.W"])


@pytest.mark.parametrize("name,bits", [("sign", None), ("round", 3), ("hardtanh", None)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ste_remat_gradients_are_bit_for_bit_the_plain_ones(name, bits, dtype) -> None:
    model = MLP([6] + [9] * 6 + [4], activation=name, dtype=dtype, seed=2, quantize_bits=bits)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((13, 6)), rng.integers(0, 4, 13)
    value = model.loss_and_grad(x, y, "cross_entropy")
    plain = model.grads.copy()
    for every in (1, 2, 3, 7):
        model.grads[...] = np.nan
        assert CheckpointedMLP(model, every).loss_and_grad(x, y, "cross_entropy") == value
        np.testing.assert_array_equal(model.grads, plain)


@pytest.mark.parametrize("name,bits", [("sign", None), ("round", 3), ("hardtanh", None)])
def test_ste_hessian_operator_gradient_is_the_models(name, bits) -> None:
    """The R-operator path runs on the same surrogate σ′ (and σ″ = 0)."""
    model = MLP([4, 7, 7, 3], activation=name, dtype=np.float64, seed=1, quantize_bits=bits)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((9, 4)), rng.integers(0, 3, 9)
    op = HessianOperator(model, x, y, "cross_entropy")
    assert op.loss == pytest.approx(model.loss_and_grad(x, y, "cross_entropy"), rel=1e-14)
    np.testing.assert_allclose(op.grad, model.grads, rtol=1e-12, atol=1e-15)
    Hv = op.matvec(rng.standard_normal(model.params.size))
    assert np.all(np.isfinite(Hv))


@pytest.mark.parametrize("name,bits", [("sign", None), ("round", 5), ("hardtanh", None)])
def test_ste_model_save_load_round_trip(tmp_path, name, bits) -> None:
    from distbackprop.nn import load_model
    m = MLP([4, 6, 3], activation=name, dtype=np.float32, seed=2, quantize_bits=bits)
    m.save(tmp_path / "m.npz")
    m2 = load_model(tmp_path / "m.npz")
    assert (m2.activation, m2.quantize_bits, m2.init) == (name, bits, "xavier")
    x = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_array_equal(m2.predict(x), m.predict(x))


# gradcheck around kinks --------------------------------------------------------------------
def test_gradcheck_reports_and_excludes_stencils_crossing_a_kink() -> None:
    model = MLP([2, 3, 2], activation="relu", dtype=np.float64, seed=0)
    p = model.named_params()
    p["dense0.W"][...] = [[0.5, 0.5], [1.0, -0.3], [-0.7, 0.2]]
    p["dense0.b"][...] = [0.0, 0.1, 0.2]
    x = np.array([[1.0, -1.0], [0.3, 0.9], [-0.4, 0.5]])  # row 0 puts unit 0 exactly at z = 0
    y = np.array([0, 1, 1])
    res = gradcheck(model, x, y, "cross_entropy")
    # unit 0's weights and bias move z through the kink; nothing else does
    assert res.kinks == {"dense0.W": 2, "dense0.b": 1}, res.kinks
    assert res.ok(1e-7), res
    assert res.n_checked == model.params.size
    # …and those entries really disagree with the finite difference (why they are excluded)
    model.loss_and_grad(x, y, "cross_entropy")
    analytic = model.named_grads()["dense0.b"][0]
    eps, b = 1e-6, p["dense0.b"]
    b[0] = eps
    plus = model.loss_and_grad(x, y, "cross_entropy")
    b[0] = -eps
    minus = model.loss_and_grad(x, y, "cross_entropy")
    b[0] = 0.0
    assert abs((plus - minus) / (2 * eps) - analytic) > 1e-3


def test_gradcheck_on_smooth_models_reports_no_kinks() -> None:
    rng = np.random.default_rng(0)
    model = MLP([3, 5, 2], activation="tanh", dtype=np.float64, seed=0)
    res = gradcheck(model, rng.standard_normal((4, 3)), rng.integers(0, 2, 4), "cross_entropy")
    assert res.kinks == {} and res.ok(1e-7)
