"""The fused kernels against the previous NumPy implementation (a reference copy kept here,
not in the package), thread-count independence, non-finite steps, ratios, cache fallback."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from distbackprop import kernels
from distbackprop.optim import Schedule, UpdateRule, clip_grad_norm_, make_optimizer

NAMES = ["sgd", "momentum", "nesterov", "adam", "adamw"]
MU, WD, B1, B2, EPS = 0.9, 0.01, 0.9, 0.999, 1e-8


class _Reference:
    """The NumPy update as it was before the fused kernels (same operations, same order,
    on whole arrays: the old blocks were elementwise, so blocking did not change values)."""

    def __init__(self, name: str, n: int, dtype):
        self.name, self.t = name, 0
        self.vel = np.zeros(n, dtype)
        self.m = np.zeros(n, dtype)
        self.v = np.zeros(n, dtype)

    def step_(self, p: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
        """Update p in place; returns the subtracted amount (−Δθ)."""
        self.t += 1
        tmp = np.empty_like(p)
        name = self.name
        if name == "sgd":
            np.multiply(g, lr, out=tmp)
            tmp += (lr * WD) * p
        elif name in ("momentum", "nesterov"):
            gg = p * WD
            gg += g
            self.vel *= MU
            self.vel += gg
            if name == "momentum":
                np.multiply(self.vel, lr, out=tmp)
            else:
                np.add(gg, MU * self.vel, out=tmp)
                tmp *= lr
        else:
            c1 = 1.0 - B1**self.t
            c2 = math.sqrt(1.0 - B2**self.t)
            t2 = np.empty_like(p)
            if name == "adamw":
                np.multiply(p, lr * WD, out=t2)
            else:
                np.multiply(p, WD, out=t2)
                t2 += g
                g = t2
            self.m *= B1
            np.multiply(g, 1.0 - B1, out=tmp)
            self.m += tmp
            np.multiply(g, g, out=tmp)
            self.v *= B2
            tmp *= 1.0 - B2
            self.v += tmp
            np.sqrt(self.v, out=tmp)
            tmp += EPS * c2
            np.divide(self.m, tmp, out=tmp)
            tmp *= lr * c2 / c1
            if name == "adamw":
                tmp += t2
        p -= tmp
        return tmp


SEGMENTS = [slice(0, 1000), slice(1000, 41_000), slice(41_000, 50_000)]
N = 50_000  # several kernel blocks per segment, segment ends inside blocks


def _run_pair(name: str, dtype, steps: int = 50, clip: float = 0.5):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(N).astype(dtype)
    fused = UpdateRule(name, N, dtype, SEGMENTS, Schedule("cosine", 0.01, steps, 5),
                       clip_norm=clip, momentum=MU, weight_decay=WD)
    ref = _Reference(name, N, dtype)
    pf, pr = p0.copy(), p0.copy()
    for step in range(steps):
        g = (rng.standard_normal(N) * rng.choice([1e-3, 1e-2])).astype(dtype)
        gnorm = float(np.linalg.norm(g.astype(np.float64)))
        g_before = g.copy()
        lr = fused.step_(pf, g, step, gnorm)
        np.testing.assert_array_equal(g, g_before)  # the clip is folded in: g only read
        gr = g.copy()
        clip_grad_norm_(gr, clip, norm=gnorm)
        ref.step_(pr, gr, lr)
        yield step, pf, pr, fused, ref


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_equals_previous_numpy(name: str, dtype) -> None:
    """50 steps with weight decay and clipping (some steps clip). The elementwise arithmetic
    carries no fast-math flag, so θ and the state are bit-identical to the NumPy update
    (the brief's bound was 1e-12 relative in float64; equality is what holds)."""
    for item in _run_pair(name, dtype):
        _, pf, pr, fused, ref = item
        np.testing.assert_array_equal(pf, pr)
    state = fused.state()
    if name in ("momentum", "nesterov"):
        np.testing.assert_array_equal(state["opt/velocity"], ref.vel)
    if name in ("adam", "adamw"):
        np.testing.assert_array_equal(state["opt/m"], ref.m)
        np.testing.assert_array_equal(state["opt/v"], ref.v)
    assert int(state["opt/t"][0]) == 50


@pytest.mark.parametrize("name", NAMES)
def test_update_ratios_are_per_layer_norms(name: str) -> None:
    rng = np.random.default_rng(3)
    rule = UpdateRule(name, N, np.float64, SEGMENTS, Schedule("constant", 0.01, 10),
                      momentum=MU, weight_decay=WD)
    p = rng.standard_normal(N)
    for step in range(3):
        before = p.copy()
        rule.step_(p, rng.standard_normal(N), step, math.inf)
        delta = p - before
        want = [np.linalg.norm(delta[s]) / np.linalg.norm(p[s]) for s in SEGMENTS]
        np.testing.assert_allclose(rule.update_ratios(), want, rtol=1e-12)
        np.testing.assert_allclose(rule.update_sq, [delta[s] @ delta[s] for s in SEGMENTS],
                                   rtol=1e-12)
        np.testing.assert_allclose(rule.param_sq, [p[s] @ p[s] for s in SEGMENTS], rtol=1e-12)


@pytest.mark.skipif(kernels.numba.config.NUMBA_NUM_THREADS < 2, reason="numba has one thread")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_does_not_change_a_bit(name: str, dtype) -> None:
    rng = np.random.default_rng(4)
    n = 3 * kernels.BLOCK + 123
    segs = [slice(0, 5), slice(5, 2 * kernels.BLOCK + 7), slice(2 * kernels.BLOCK + 7, n)]
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(4)]
    out = []
    for threads in (1, 2):
        opt = make_optimizer(name, n, dtype, weight_decay=WD, segments=segs, threads=threads)
        p = p0.copy()
        for g in grads:
            opt.step_(p, g, 1e-2, 0.7)
        out.append((p, {k: v.copy() for k, v in opt.state.items()}, opt.update_sq.copy(),
                    opt.param_sq.copy()))
    (p1, s1, u1, q1), (p2, s2, u2, q2) = out
    np.testing.assert_array_equal(p1, p2)
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(q1, q2)


@pytest.mark.parametrize("name", NAMES)
def test_nan_gradient_reaches_params_only_if_stepped(name: str) -> None:
    """A non-finite step is the caller's to skip (it does not call step_); if called, NaN
    propagates into θ (no fast-math flag assumes finite values) and is reported."""
    rule = UpdateRule(name, 100, np.float32, [slice(0, 50), slice(50, 100)],
                      Schedule("constant", 0.1, 10), clip_norm=1.0)
    p = np.ones(100, np.float32)
    g = np.full(100, 0.1, np.float32)
    rule.step_(p, g, 0, float(np.linalg.norm(g)))
    assert not rule.nonfinite_update()
    saved_p, saved_state = p.copy(), rule.state()
    g[7] = np.nan
    # skip path: the caller sees the non-finite norm and does not call step_: nothing changes
    np.testing.assert_array_equal(p, saved_p)
    rule.step_(p, g, 1, float("nan"))
    assert np.isnan(p[7]) and rule.nonfinite_update()
    assert np.isnan(rule.update_sq[0]) and np.isfinite(rule.update_sq[1])
    assert np.isfinite(p[50:]).all()
    rule.load_state_({"params": saved_p, **saved_state})  # the runtime rolls back like this
    assert int(rule.state()["opt/t"][0]) == 1


def test_read_only_gradient_and_dtype_checks() -> None:
    opt = make_optimizer("adam", 64, np.float32)
    g = np.ones(64, np.float32)
    g.flags.writeable = False  # as received from Ray's object store
    p = np.zeros(64, np.float32)
    opt.step_(p, g, 1e-3)
    assert p[0] < 0
    with pytest.raises(ValueError, match="grads"):
        opt.step_(p, np.ones(64), 1e-3)  # float64 gradient for float32 params
    with pytest.raises(ValueError, match="params"):
        opt.step_(np.zeros(128, np.float32)[::2], np.ones(64, np.float32), 1e-3)


def test_segments_must_be_disjoint_and_gaps_are_updated() -> None:
    with pytest.raises(ValueError, match="disjoint"):
        make_optimizer("sgd", 10, np.float64, segments=[slice(0, 6), slice(5, 10)])
    opt = make_optimizer("sgd", 10, np.float64, segments=[slice(2, 4)], weight_decay=0.0)
    p = np.zeros(10)
    opt.step_(p, np.ones(10), 1.0)
    np.testing.assert_array_equal(p, -np.ones(10))  # every element, not just the segments
    np.testing.assert_allclose(opt.update_sq, [2.0])


def test_cache_dir_falls_back_to_a_writable_temp_dir(monkeypatch, tmp_path) -> None:
    """Read-only install and home: the kernels cache under the temp dir instead of failing."""
    monkeypatch.setattr(kernels.numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(kernels.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(kernels, "_writable",
                        lambda path: str(path).startswith(str(tmp_path)))
    chosen = kernels._ensure_cache_dir()
    assert chosen is not None and chosen.startswith(str(tmp_path))
    assert kernels.numba.config.CACHE_DIR == chosen
    monkeypatch.setattr(kernels.numba.config, "CACHE_DIR", "/read-only/numba")
    chosen = kernels._ensure_cache_dir()  # a NUMBA_CACHE_DIR that cannot be written: same
    assert chosen is not None and chosen.startswith(str(tmp_path))
    monkeypatch.setattr(kernels, "_writable", lambda path: True)
    monkeypatch.setattr(kernels.numba.config, "CACHE_DIR", "")
    assert kernels._ensure_cache_dir() is None  # numba's own choice works: leave it


_THREADS_PROBE = """
import os, sys, numpy as np
from distbackprop import kernels  # noqa: F401 - numba loaded before the count
from distbackprop.optim import make_optimizer
n = 1 << 16
before = len(os.listdir("/proc/self/task"))
opt = make_optimizer("adam", n, np.float32, threads=int(sys.argv[1]))
p, g = np.ones(n, np.float32), np.full(n, 0.5, np.float32)
for _ in range(3):
    opt.step_(p, g, 1e-3)
print(before, len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_one_thread_updates_on_the_calling_thread() -> None:
    """threads=1 runs the serial twin on the caller's thread: numba starts no pool thread to
    hand the update to (with 2 threads it does: the probe can see a pool start)."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    counts = {}
    for threads in (1, 2):
        r = subprocess.run([sys.executable, "-c", _THREADS_PROBE, str(threads)], env=env,
                           capture_output=True, text=True, timeout=300, check=True)
        counts[threads] = tuple(map(int, r.stdout.split()))
    assert counts[1][1] == counts[1][0], counts
    assert counts[2][1] > counts[2][0], counts


def test_steps_from_two_threads_at_once_are_serialised() -> None:
    """numba's workqueue layer aborts on concurrent launches: the launch lock prevents it."""
    from concurrent.futures import ThreadPoolExecutor

    n = 4 * kernels.BLOCK
    rng = np.random.default_rng(5)
    g = rng.standard_normal(n).astype(np.float32)

    def run(_: int) -> np.ndarray:
        opt = make_optimizer("adam", n, np.float32, threads=2)
        p = np.ones(n, np.float32)
        for _ in range(20):
            opt.step_(p, g, 1e-3)
        return p

    with ThreadPoolExecutor(2) as ex:
        a, b = ex.map(run, range(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, run(0))


def test_blas_env() -> None:
    from distbackprop.optim import blas_env
    env = blas_env(3)
    assert env["OPENBLAS_NUM_THREADS"] == env["NUMBA_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "3"
    assert "OPENBLAS_THREAD_TIMEOUT" not in env
    assert blas_env(1, thread_timeout=4)["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert env["NUMBA_THREADING_LAYER"] == "workqueue"
    assert blas_env(0)["OPENBLAS_NUM_THREADS"] == "1"
