"""Optimizers: the first two steps against textbook formulas; clipping; schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distbackprop.optim import Schedule, clip_grad_norm_, make_optimizer

LR, MU, WD = 0.1, 0.9, 0.01
B1, B2, EPS = 0.9, 0.999, 1e-8


def _textbook(name: str, p0: np.ndarray, grads: list[np.ndarray]) -> list[np.ndarray]:
    """Two steps written out as in the papers (weight decay WD everywhere)."""
    p = p0.copy()
    v = np.zeros_like(p)
    m = np.zeros_like(p)
    s = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        if name == "sgd":
            p = p - LR * (g + WD * p)
        elif name == "momentum":
            v = MU * v + (g + WD * p)
            p = p - LR * v
        elif name == "nesterov":
            gg = g + WD * p
            v = MU * v + gg
            p = p - LR * (gg + MU * v)
        elif name in ("adam", "adamw"):
            gg = g + WD * p if name == "adam" else g
            m = B1 * m + (1 - B1) * gg
            s = B2 * s + (1 - B2) * gg * gg
            m_hat = m / (1 - B1**t)
            s_hat = s / (1 - B2**t)
            step = LR * m_hat / (np.sqrt(s_hat) + EPS)
            if name == "adamw":
                step = step + LR * WD * p
            p = p - step
        out.append(p.copy())
    return out


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("threads", [1, 2])
def test_first_two_steps_match_textbook(name: str, threads: int) -> None:
    rng = np.random.default_rng(0)
    n = 300_000  # several blocks, so the blocked/threaded path is exercised
    p = rng.standard_normal(n)
    grads = [rng.standard_normal(n), rng.standard_normal(n)]
    expected = _textbook(name, p, grads)
    opt = make_optimizer(name, n, np.float64, momentum=MU, weight_decay=WD,
                         segments=[slice(0, 1000), slice(1000, n)], threads=threads)
    for g, want in zip(grads, expected, strict=True):
        opt.step_(p, g, LR)
        np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)
    opt.close()


def test_update_ratio_per_segment() -> None:
    rng = np.random.default_rng(1)
    p = rng.standard_normal(500)
    before = p.copy()
    opt = make_optimizer("sgd", 500, np.float64, segments=[slice(0, 100), slice(100, 500)])
    opt.step_(p, rng.standard_normal(500), 0.01)
    delta = p - before
    want = [np.linalg.norm(delta[:100]) / np.linalg.norm(p[:100]),
            np.linalg.norm(delta[100:]) / np.linalg.norm(p[100:])]
    np.testing.assert_allclose(opt.update_ratios(), want, rtol=1e-12)


def test_optimizer_state_is_flat_and_reloadable() -> None:
    rng = np.random.default_rng(2)
    a = make_optimizer("adam", 50, np.float32)
    p = rng.standard_normal(50).astype(np.float32)
    g = rng.standard_normal(50).astype(np.float32)
    a.step_(p, g, 1e-3)
    assert all(v.ndim == 1 for v in a.state.values())
    b = make_optimizer("adam", 50, np.float32)
    b.load_state_({k: v.copy() for k, v in a.state.items()})
    p2 = p.copy()
    a.step_(p, g, 1e-3)
    b.step_(p2, g, 1e-3)
    np.testing.assert_array_equal(p, p2)


def test_clip_returns_preclip_norm_and_scales() -> None:
    g = np.array([3.0, 4.0])
    assert clip_grad_norm_(g, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(g, [0.6, 0.8], rtol=1e-9)
    g = np.array([0.3, 0.4])
    assert clip_grad_norm_(g, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(g, [0.3, 0.4])
    g = np.array([np.nan, 1.0])
    assert math.isnan(clip_grad_norm_(g, 1.0))


def test_schedules() -> None:
    s = Schedule("constant", 0.1, 100, warmup=10)
    assert s(0) == pytest.approx(0.01) and s(9) == pytest.approx(0.1) and s(50) == 0.1
    c = Schedule("cosine", 0.1, 110, warmup=10)
    assert c(10) == pytest.approx(0.1) and c(60) == pytest.approx(0.05) and c(110) == 0.0
    st = Schedule("step", 1.0, 100, step_size=10, gamma=0.5)
    assert [st(0), st(10), st(25)] == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="lr_schedule"):
        Schedule("linear", 0.1, 10)


def test_unknown_optimizer_named() -> None:
    with pytest.raises(ValueError, match="optimizer: 'rmsprop'"):
        make_optimizer("rmsprop", 3)
