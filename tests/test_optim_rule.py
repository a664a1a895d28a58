"""`UpdateRule`: schedule + clipping + optimizer, its "opt/" state layout, and shards."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from distbackprop.optim import Schedule, UpdateRule, clip_grad_norm_, make_optimizer

N = 3000
SEGMENTS = [slice(0, 700), slice(700, 2900), slice(2900, 3000)]


def _config(**kw) -> SimpleNamespace:
    base = dict(optimizer="adam", lr=1e-2, momentum=0.9, weight_decay=0.01, clip_norm=1.0,
                lr_schedule="cosine", warmup_steps=3, lr_step_size=10, lr_gamma=0.5,
                cpus_per_worker=1)
    base.update(kw)
    return SimpleNamespace(**base)


def _grads(rng: np.random.Generator, steps: int, dtype) -> list[np.ndarray]:
    # scales around the clip norm, so some steps clip and some do not
    return [(rng.standard_normal(N) * rng.choice([0.005, 0.05])).astype(dtype)
            for _ in range(steps)]


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_rule_equals_schedule_clip_optimizer(name: str) -> None:
    """step_ = lr from the schedule, clip with the given norm, then the optimizer."""
    cfg = _config(optimizer=name)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(N)
    rule = UpdateRule.from_config(cfg, N, np.float64, SEGMENTS, total_steps=20)
    opt = make_optimizer(name, N, np.float64, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, segments=SEGMENTS)
    sched = Schedule(cfg.lr_schedule, cfg.lr, 20, cfg.warmup_steps, cfg.lr_step_size,
                     cfg.lr_gamma)
    pa, pb = p0.copy(), p0.copy()
    for step, g in enumerate(_grads(rng, 20, np.float64)):
        gnorm = float(np.linalg.norm(g))
        lr = rule.step_(pa, g.copy(), step, gnorm)
        assert lr == sched(step) == rule.lr(step)
        gb = g.copy()
        clip_grad_norm_(gb, cfg.clip_norm, norm=gnorm)
        opt.step_(pb, gb, lr)
        np.testing.assert_allclose(pa, pb, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(rule.update_ratios(), opt.update_ratios(), rtol=1e-9)


def test_state_layout_and_round_trip() -> None:
    cfg = _config()
    rng = np.random.default_rng(1)
    grads = _grads(rng, 10, np.float32)
    p = rng.standard_normal(N).astype(np.float32)
    a = UpdateRule.from_config(cfg, N, np.float32, SEGMENTS, total_steps=10)
    assert set(a.state()) == {"opt/t", "opt/m", "opt/v"}
    assert a.state_bytes() == sum(v.nbytes for v in a.state().values())
    for s in range(5):
        a.step_(p, grads[s].copy(), s, float(np.linalg.norm(grads[s])))
    saved = {"params": p.copy(), **a.state()}
    views = a.state_views()
    assert all(np.shares_memory(views[k], a.optimizer.state[k[4:]]) for k in views)
    b = UpdateRule.from_config(cfg, N, np.float32, SEGMENTS, total_steps=10)
    b.load_state_(saved)  # "params" is ignored
    q = saved["params"].copy()
    for s in range(5, 10):
        gn = float(np.linalg.norm(grads[s]))
        a.step_(p, grads[s].copy(), s, gn)
        b.step_(q, grads[s].copy(), s, gn)
    np.testing.assert_array_equal(p, q)  # resuming mid-run continues bit for bit


def test_load_state_names_the_bad_key() -> None:
    rule = UpdateRule.from_config(_config(), N, np.float32, SEGMENTS, total_steps=10)
    good = rule.state()
    with pytest.raises(ValueError, match="'opt/v'"):
        rule.load_state_({k: v for k, v in good.items() if k != "opt/v"})
    with pytest.raises(ValueError, match="'opt/m'"):
        rule.load_state_({**good, "opt/m": np.zeros(N + 1, np.float32)})


def test_shards_together_equal_the_whole() -> None:
    """Two rules over [0, 1500) and [1500, N) (a segment cut in two) = one rule over all."""
    cfg = _config(optimizer="adamw")
    rng = np.random.default_rng(2)
    grads = _grads(rng, 6, np.float64)
    p_full = rng.standard_normal(N)
    p_shard = p_full.copy()
    whole = UpdateRule.from_config(cfg, N, np.float64, SEGMENTS, total_steps=6)
    parts = [UpdateRule.from_config(cfg, N, np.float64, SEGMENTS, total_steps=6, shard=s)
             for s in ((0, 1500), (1500, N))]
    assert parts[0].state()["opt/m"].shape == (1500,)
    for step, g in enumerate(grads):
        gnorm = float(np.linalg.norm(g))
        whole.step_(p_full, g.copy(), step, gnorm)
        usq = np.zeros(len(SEGMENTS))
        psq = np.zeros(len(SEGMENTS))
        for r in parts:
            r.step_(p_shard, g.copy(), step, gnorm)  # full buffers: each takes its shard
            usq += r.update_sq
            psq += r.param_sq
        np.testing.assert_allclose(p_shard, p_full, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(UpdateRule.ratios(usq, psq), whole.update_ratios(),
                                   rtol=1e-9)
    assert parts[0].param_sq[2] == 0.0 and parts[1].param_sq[0] == 0.0


def test_step_rejects_wrong_buffer_shape() -> None:
    rule = UpdateRule.from_config(_config(), N, np.float32, SEGMENTS, total_steps=10,
                                  shard=(0, 1000))
    with pytest.raises(ValueError, match="params"):
        rule.step_(np.zeros(999, np.float32), np.zeros(1000, np.float32), 0, 0.0)
