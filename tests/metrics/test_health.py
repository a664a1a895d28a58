"""Gradient-health statistics against values computed directly, and the detectors on
real networks: a deep sigmoid net vanishes, a large-init relu net explodes, a He-init
relu net is healthy."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.metrics import health
from distbackprop.metrics.health import (
    PHASES,
    StepStats,
    classify,
    grad_health,
    layer_norms,
    sum_health,
    update_ratios,
    update_ratios_between,
)

SLICES = {"dense0": slice(0, 70), "dense1": slice(70, 100), "dense2": slice(100, 103)}


def _direct_norms(flat, slices):
    return np.array([np.sqrt(np.sum(np.asarray(flat[s], dtype=np.float64) ** 2))
                     for s in slices.values()])


def test_phases_order():
    assert PHASES == ("data", "forward", "backward", "allreduce", "update")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_norms_equal_direct(dtype):
    g = np.random.default_rng(1).standard_normal(103).astype(dtype)
    got = layer_norms(g, SLICES)
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got, _direct_norms(g, SLICES), rtol=1e-6 if dtype == np.float32
                               else 1e-13)


def test_layer_norms_float32_extremes_summed_in_float64():
    # Squares of 1e-25 underflow and squares of 1e25 overflow in float32; the
    # float64 re-summation must give the true norms.
    g = np.ones(103, dtype=np.float32)
    g[SLICES["dense0"]] = 1e-25
    g[SLICES["dense1"]] = 1e25
    got = layer_norms(g, SLICES)
    direct = _direct_norms(g, SLICES)
    assert np.all(np.isfinite(got)) and got[0] > 0
    np.testing.assert_allclose(got, direct, rtol=1e-6)


def test_layer_norms_rejects_2d():
    with pytest.raises(ValueError, match="1-D"):
        layer_norms(np.zeros((3, 3)), {"a": slice(0, 3)})


def test_update_ratios_equal_direct():
    rng = np.random.default_rng(2)
    theta = rng.standard_normal(103)
    delta = 1e-3 * rng.standard_normal(103)
    want = _direct_norms(delta, SLICES) / _direct_norms(theta, SLICES)
    np.testing.assert_allclose(update_ratios(delta, theta, SLICES), want, rtol=1e-13)


def test_update_ratio_zero_params():
    theta = np.zeros(103)
    delta = np.zeros(103)
    delta[SLICES["dense1"]] = 0.5
    r = update_ratios(delta, theta, SLICES)
    assert r[0] == 0.0 and r[1] == np.inf and r[2] == 0.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_update_ratios_between_matches_delta_across_blocks(dtype):
    rng = np.random.default_rng(3)
    n = 3 * health._BLOCK + 17
    slices = {"a": slice(0, health._BLOCK + 5), "b": slice(health._BLOCK + 5, n - 3),
              "c": slice(n - 3, n)}
    before = rng.standard_normal(n).astype(dtype)
    after = (before + 1e-3 * rng.standard_normal(n)).astype(dtype)
    want = (_direct_norms(after.astype(np.float64) - before.astype(np.float64), slices)
            / _direct_norms(before, slices))
    np.testing.assert_allclose(update_ratios_between(before, after, slices), want,
                               rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_grad_health_equals_direct():
    g = np.random.default_rng(4).standard_normal(110)   # 7 trailing entries in no layer
    g[5] = -9.5
    h = grad_health(g, SLICES)
    inside = g[:103]
    assert h["grad_global_norm"] == pytest.approx(np.linalg.norm(inside), rel=1e-13)
    np.testing.assert_allclose(h["grad_norm"], _direct_norms(g, SLICES), rtol=1e-13)
    assert h["grad_max_abs"] == 9.5
    assert h["nonfinite"] == 0
    assert h["nonfinite_per_layer"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grad_health_counts_nonfinite(dtype):
    g = np.random.default_rng(5).standard_normal(103).astype(dtype)
    g[3] = np.nan
    g[4] = np.inf
    g[80] = -np.inf
    g[90] = 42.0
    h = grad_health(g, SLICES)
    assert h["nonfinite"] == 3
    assert h["nonfinite_per_layer"].tolist() == [2, 1, 0]
    assert not np.isfinite(h["grad_norm"][0]) and not np.isfinite(h["grad_norm"][1])
    assert np.isfinite(h["grad_norm"][2])
    assert not np.isfinite(h["grad_global_norm"])
    assert h["grad_max_abs"] == 42.0            # over the finite entries


def test_grad_health_all_nonfinite():
    g = np.full(103, np.nan)
    h = grad_health(g, SLICES)
    assert h["nonfinite"] == 103 and np.isnan(h["grad_max_abs"])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_pass_health_equals_numpy_path(dtype):
    """The kernel (one read, Σg² in float64, max |g| from bit patterns) against the NumPy
    path and against float64 sums; the largest magnitude is negative, and a -0.0 layer."""
    g = np.random.default_rng(6).standard_normal(20_000).astype(dtype)
    g[123] = -31.25
    g[19_990:] = -0.0
    slices = {"a": slice(0, 7_000), "b": slice(7_000, 19_990), "c": slice(19_990, 20_000)}
    fast, exact = grad_health(g, slices), health._exact_health(g, slices)
    assert fast["grad_max_abs"] == exact["grad_max_abs"] == 31.25
    np.testing.assert_allclose(fast["grad_norm"], _direct_norms(g, slices), rtol=1e-13)
    np.testing.assert_allclose(fast["grad_norm"], exact["grad_norm"],
                               rtol=1e-13 if dtype == np.float64 else 1e-5)
    assert fast["grad_norm"][2] == 0.0 and fast["nonfinite_per_layer"].tolist() == [0, 0, 0]


def test_one_pass_health_falls_back_for_strided_layers():
    g = np.arange(10.0)
    h = grad_health(g, {"even": slice(0, 10, 2)})
    assert h["grad_norm"][0] == pytest.approx(np.sqrt(np.sum(np.arange(0, 10, 2) ** 2.0)))
    assert h["grad_max_abs"] == 8.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("nparts", [2, 3])
def test_sum_health_adds_in_rank_order_and_takes_its_health(dtype, nparts):
    """The sharded block sum: out equals NumPy's chain of adds to the bit (over more than
    one cache block), its health equals `grad_health(out)`'s."""
    rng = np.random.default_rng(7)
    parts = [rng.standard_normal(70_000).astype(dtype) for _ in range(nparts)]
    lo, n = 12_345, 40_000
    slices = {"a": slice(0, 25_000), "b": slice(25_000, 40_000)}
    out = np.empty(n, dtype)
    h = sum_health(parts, lo, out, slices)
    ref = parts[0][lo:lo + n] + parts[1][lo:lo + n]
    for p in parts[2:]:
        ref = ref + p[lo:lo + n]
    assert np.array_equal(out, ref)
    g = grad_health(ref, slices)
    np.testing.assert_allclose(h["grad_norm"], g["grad_norm"], rtol=1e-13)
    assert h["grad_max_abs"] == g["grad_max_abs"] == np.abs(ref).max()


@pytest.mark.parametrize("nparts", [2, 3])
def test_sum_health_in_place_over_each_part(nparts):
    """out may be a part's own block (the worker sums into its gradient's block): every
    choice of that part gives the out-of-place sum, through the kernel and the NumPy path."""
    rng = np.random.default_rng(8)
    pristine = [rng.standard_normal(50_000).astype(np.float32) for _ in range(nparts)]
    lo, n = 10_000, 36_000
    ref = np.empty(n, np.float32)
    sum_health([p.copy() for p in pristine], lo, ref, {"a": slice(0, n)})
    for k in range(nparts):
        for slices in ({"a": slice(0, n)}, {"a": slice(1, n)}):  # kernel; NumPy (a gap)
            parts = [p.copy() for p in pristine]
            sum_health(parts, lo, parts[k][lo:lo + n], slices)
            assert np.array_equal(parts[k][lo:lo + n], ref), (k, slices)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_health_kernels_compile_nothing_in_a_step_after_warm(dtype):
    """`kernels.warm` (run when an update rule is built) compiles the signatures a step's
    `grad_health` and 2-rank `sum_health` use (a new one would compile inside the step)."""
    from distbackprop import kernels
    kernels.warm((dtype,), ("adam", "health"), (1,))
    before = {f: len(f.signatures) for f in (kernels.health_, kernels.sum_health_)}
    slices = {"a": slice(0, 600), "b": slice(600, 1000)}
    grad_health(np.ones(1000, dtype), slices)
    parts = [np.ones(2000, dtype), np.ones(2000, dtype)]
    sum_health(parts, 500, parts[1][500:1500], slices)
    assert {f: len(f.signatures) for f in before} == before


def test_sum_health_nonfinite_and_gaps_take_the_exact_path():
    parts = [np.ones(20), np.ones(20)]
    parts[1][3] = np.inf
    out = np.empty(10)
    h = sum_health(parts, 0, out, {"a": slice(0, 5), "b": slice(5, 10)})
    assert h["nonfinite_per_layer"].tolist() == [1, 0] and h["grad_max_abs"] == 2.0
    out2 = np.empty(10)
    h2 = sum_health(parts, 10, out2, {"a": slice(2, 6)})    # layers do not tile the block
    assert np.array_equal(out2, np.full(10, 2.0)) and h2["grad_norm"][0] == 4.0


def test_classify_rule():
    norms = np.array([1e-8, 1e-7, 1.0, 1e3, 1001.0, np.nan, np.inf])
    v, e = classify(norms, 1e-7, 1e3)
    assert v.tolist() == [True, False, False, False, False, False, False]
    assert e.tolist() == [False, False, False, False, True, True, True]
    # a layer with a non-finite entry explodes even if its norm was computed finite
    v, e = classify(np.ones(3), 1e-7, 1e3, nonfinite_per_layer=np.array([0, 2, 0]))
    assert e.tolist() == [False, True, False] and not v.any()
    # vanish_threshold 0 turns the vanishing detector off
    v, _ = classify(np.array([0.0, 1e-30]), 0.0, 1e3)
    assert not v.any()


def test_classify_per_step_matrix():
    norms = np.array([[1e-9, 1.0], [1.0, 1e5]])
    v, e = classify(norms, 1e-7, 1e3)
    assert v.shape == e.shape == (2, 2)
    assert v.tolist() == [[True, False], [False, False]]
    assert e.tolist() == [[False, False], [False, True]]


# ------------------------------------------------------------ real networks
def _mlp_grads(depth: int, activation: str, init: str, init_scale: float = 1.0):
    from distbackprop.nn import MLP

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16))
    y = rng.integers(0, 4, 64)
    m = MLP([16] + [32] * (depth - 1) + [4], activation=activation, init=init,
            init_scale=init_scale, seed=0)
    m.loss_and_grad(x, y, loss="cross_entropy")
    return m, grad_health(m.grads, m.layer_slices())


def test_detector_fires_on_deep_sigmoid_network():
    m, h = _mlp_grads(16, "sigmoid", "xavier")
    v, e = classify(h["grad_norm"], 1e-7, 1e3, h["nonfinite_per_layer"])
    assert v[0], f"first layer should vanish: {h['grad_norm']}"
    assert not v[-1] and not e.any()
    # the norms fall monotonically-ish from the output back to the input
    assert h["grad_norm"][0] < 1e-5 * h["grad_norm"][-1]


def test_detector_fires_on_exploding_network():
    m, h = _mlp_grads(12, "relu", "he", init_scale=3.0)
    v, e = classify(h["grad_norm"], 1e-7, 1e3, h["nonfinite_per_layer"])
    assert e.all(), h["grad_norm"]
    assert not v.any()


def test_detector_silent_on_healthy_network():
    m, h = _mlp_grads(12, "relu", "he")
    v, e = classify(h["grad_norm"], 1e-7, 1e3, h["nonfinite_per_layer"])
    assert not v.any() and not e.any(), h["grad_norm"]
    # the statistics of a real model equal the direct computation too
    np.testing.assert_allclose(h["grad_norm"], _direct_norms(m.grads, m.layer_slices()),
                               rtol=1e-13)


def test_detector_flags_nonfinite_network_gradient():
    m, h = _mlp_grads(4, "relu", "he")
    g = m.grads.copy()
    g[m.layer_slices()["dense1"].start] = np.inf
    h = grad_health(g, m.layer_slices())
    v, e = classify(h["grad_norm"], 1e-7, 1e3, h["nonfinite_per_layer"])
    assert e.tolist() == [False, True, False, False]


# ------------------------------------------------------------ StepStats
def _health(L, norm=1.0):
    return {"grad_global_norm": norm * np.sqrt(L), "grad_norm": np.full(L, norm),
            "grad_max_abs": norm, "nonfinite": 0}


def test_stepstats_records_rows_without_growing():
    s = StepStats(4, ["dense0", "dense1"])
    buffers = [id(getattr(s, f)) for f in StepStats.FIELDS]
    for k in range(3):
        s.record(step=10 + k, epoch=0, loss=0.5 * k, samples=32, lr=1e-3,
                 health=_health(2, k + 1.0), update_ratio=np.array([1e-3, 2e-3]),
                 skipped=k == 1, step_seconds=0.01, phase_seconds=[1, 2, 3, 4, 5])
    d = s.as_dict()
    assert [id(getattr(s, f)) for f in StepStats.FIELDS] == buffers
    assert set(d) == set(StepStats.FIELDS)
    assert d["step"].tolist() == [10, 11, 12] and d["step"].dtype == np.int64
    assert d["grad_norm"].shape == (3, 2) and d["grad_norm"][2].tolist() == [3.0, 3.0]
    assert d["phase_seconds"].shape == (3, 5) and d["phase_seconds"].dtype == np.float64
    assert d["skipped"].tolist() == [False, True, False] and d["skipped"].dtype == bool
    assert d["nonfinite"].dtype == np.int64 and d["samples"].dtype == np.int64
    # as_dict copies: the next chunk reuses the buffers
    s.reset()
    s.record(step=99, epoch=1, loss=0.0, samples=1, lr=0.0, health=_health(2),
             update_ratio=None, skipped=False, step_seconds=0.0, phase_seconds=[0] * 5)
    assert d["step"].tolist() == [10, 11, 12]
    assert s.as_dict()["update_ratio"].tolist() == [[0.0, 0.0]]


def test_stepstats_full_raises_and_reset_grows():
    s = StepStats(1, ["a"])
    kw = dict(step=0, epoch=0, loss=0.0, samples=1, lr=0.0, health=_health(1),
              update_ratio=None, skipped=False, step_seconds=0.0, phase_seconds=[0] * 5)
    s.record(**kw)
    with pytest.raises(IndexError, match="full"):
        s.record(**kw)
    s.reset(capacity=3)
    for _ in range(3):
        s.record(**kw)
    assert len(s) == 3 and s.capacity == 3
