"""--model rnn data-parallel: N Ray workers ≡ one process (params and per-time gradient norms),
full and truncated BPTT, last and every target; kill/recover and --resume stay bit-identical."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from distbackprop import TrainConfig, Trainer
from tests.seqdata import write_sequences

pytestmark = pytest.mark.ray

BASE = dict(model="rnn", hidden=(8,), dtype="float64", max_steps=20, batch_size=24, seed=4,
            metrics_port=0, quiet=True, chunk_steps=5, val_fraction=0.1, lr=0.01)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("seq")
    return {t: str(write_sequences(d / f"{t}.parquet", n=120, T=10, F=3, target=t))
            for t in ("last", "every")}


def _fit(path, **kw):
    return Trainer(TrainConfig(**{**BASE, **kw, "out": str(path)})).fit()


def _time_cols(res) -> dict[str, np.ndarray]:
    return {c: res.history.column(c).to_numpy() for c in res.history.column_names
            if c.startswith("time_grad_norm/")}


_local_cache: dict = {}


def _local(data, tmp_path_factory, target, truncate):
    key = (target, truncate)
    if key not in _local_cache:
        _local_cache[key] = _fit(tmp_path_factory.mktemp("local") / "run", local=True,
                                 data=data[target], sequence_target=target,
                                 bptt_truncate=truncate)
    return _local_cache[key]


@pytest.mark.parametrize("workers,target,truncate", [
    (2, "last", None), (3, "last", None), (2, "every", 3), (3, "every", 3),
    (2, "last", 4), (3, "every", None)])
def test_rnn_workers_equal_local(ray_cluster, data, tmp_path, tmp_path_factory, workers,
                                 target, truncate):
    ref = _local(data, tmp_path_factory, target, truncate)
    res = _fit(tmp_path / "run", workers=workers, data=data[target], sequence_target=target,
               bptt_truncate=truncate)
    rel = np.linalg.norm(res.model.params - ref.model.params) / np.linalg.norm(ref.model.params)
    assert rel < 1e-10, rel
    assert res.summary["steps"] == 20
    np.testing.assert_allclose(res.history.column("loss").to_numpy(),
                               ref.history.column("loss").to_numpy(), rtol=1e-10)
    # per-time-step gradient norms: Σ over ranks of Σ_rows ‖∂L/∂h_t‖², then sqrt
    got, want = _time_cols(res), _time_cols(ref)
    assert len(want) == 4 and set(got) == set(want)
    # (truncated BPTT with a last-step loss leaves the early buckets exactly 0: the graph is
    # cut before them)
    assert np.all(list(want.values())[-1] > 0)
    for c in want:
        np.testing.assert_allclose(got[c], want[c], rtol=1e-10, err_msg=c)


def test_rnn_sharded_update_equals_local(ray_cluster, data, tmp_path, tmp_path_factory):
    ref = _local(data, tmp_path_factory, "every", 3)
    res = _fit(tmp_path / "run", workers=2, update_on="sharded", data=data["every"],
               sequence_target="every", bptt_truncate=3)
    rel = np.linalg.norm(res.model.params - ref.model.params) / np.linalg.norm(ref.model.params)
    assert rel < 1e-10, rel
    for c, want in _time_cols(ref).items():
        np.testing.assert_allclose(_time_cols(res)[c], want, rtol=1e-10, err_msg=c)


@pytest.mark.parametrize("kw", [{"update_on": "coordinator"},
                                {"update_on": "workers", "overlap": True}])
def test_rnn_coordinator_update_and_overlap_equal_local(ray_cluster, data, tmp_path,
                                                        tmp_path_factory, kw):
    ref = _local(data, tmp_path_factory, "last", None)
    res = _fit(tmp_path / "run", workers=2, data=data["last"], **kw)
    rel = np.linalg.norm(res.model.params - ref.model.params) / np.linalg.norm(ref.model.params)
    assert rel < 1e-10, rel
    for c, want in _time_cols(ref).items():
        np.testing.assert_allclose(_time_cols(res)[c], want, rtol=1e-10, err_msg=c)


def test_rnn_sigkill_worker_recovers_bit_identical(ray_cluster, data, tmp_path, monkeypatch):
    kw = dict(workers=2, data=data["last"], max_steps=30, chunk_steps=4)
    reference = _fit(tmp_path / "ref", **kw)
    d = tmp_path / "faults"
    d.mkdir()
    monkeypatch.setenv("DISTBACKPROP_TEST_FAULTS",
                       json.dumps({"pause_at": {"13": [1]}, "dir": str(d)}))
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("res", _fit(tmp_path / "run", **kw)),
                         daemon=True)
    t.start()
    pidfile = d / "pause-13-1.pid"
    deadline = time.monotonic() + 120
    while not pidfile.exists() and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.05)
    assert pidfile.exists(), "rank 1 never reached step 13"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive()
    res = box["res"]
    assert res.summary["restarts"] == 1
    assert np.array_equal(res.model.params, reference.model.params)  # bit-identical
    for c, want in _time_cols(reference).items():
        assert np.array_equal(_time_cols(res)[c], want), c


def test_rnn_resume_is_bit_identical(ray_cluster, data, tmp_path):
    kw = dict(workers=2, data=data["every"], sequence_target="every", bptt_truncate=3,
              chunk_steps=None)
    full = _fit(tmp_path / "full", max_steps=40, **kw)
    _fit(tmp_path / "part", max_steps=20, checkpoint_every=10, **kw)
    resumed = _fit(tmp_path / "ignored", resume=str(tmp_path / "part"), max_steps=40,
                   checkpoint_every=10, **kw)
    assert np.array_equal(resumed.model.params, full.model.params)
    assert list(resumed.history.column("step").to_numpy()) == list(range(40))
    for c, want in _time_cols(full).items():
        assert np.array_equal(_time_cols(resumed)[c], want), c
