"""The headline: N Ray workers with an MPI allreduce give the one-process result."""

from __future__ import annotations

import os

import numpy as np
import psutil
import pytest

from distbackprop import TrainConfig, Trainer

pytestmark = pytest.mark.ray

BASE = dict(hidden=(16,), dtype="float64", max_steps=24, batch_size=50, seed=3,
            metrics_port=0, quiet=True, chunk_steps=5, val_fraction=0.1)


def _fit(tmp_path, name, **kw):
    cfg = TrainConfig(**{**BASE, **kw, "out": str(tmp_path / name)})
    return Trainer(cfg).fit()


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("local"), "local", local=True)


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("update_on", ["workers", "coordinator"])
def test_workers_equal_local(ray_cluster, local_result, tmp_path, workers, update_on):
    res = _fit(tmp_path, f"w{workers}", workers=workers, update_on=update_on)
    ref = local_result.model.params
    got = res.model.params
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-10, rel
    assert res.summary["workers"] == workers
    assert res.summary["steps"] == 24
    np.testing.assert_allclose(res.history.column("loss").to_numpy(),
                               local_result.history.column("loss").to_numpy(), rtol=1e-9)
    _assert_gone(res.worker_pids, workers)


def _assert_gone(pids, workers):
    """Every worker process the run started has exited."""
    assert len(pids) == workers
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_uneven_last_batch_and_tiny_shards(ray_cluster, tmp_path):
    """batch 7 over 3 workers: ranks get 3, 2, 2 rows; the last batch of an epoch is short."""
    a = _fit(tmp_path, "l", local=True, batch_size=7, max_steps=30)
    b = _fit(tmp_path, "w", workers=3, batch_size=7, max_steps=30)
    rel = np.linalg.norm(a.model.params - b.model.params) / np.linalg.norm(a.model.params)
    assert rel < 1e-10


def test_nonfinite_on_one_rank_skips_everywhere(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTBACKPROP_TEST_FAULTS", '{"nan_at": {"7": [1]}}')
    res = _fit(tmp_path, "nan", workers=2)
    skipped = res.history.column("skipped").to_numpy()
    steps = res.history.column("step").to_numpy()
    assert list(steps[skipped]) == [7]
    assert res.summary["skipped_steps"] == 1
    # replicas stayed identical: the run would have failed on a checksum mismatch otherwise;
    # and the same skip in one process gives the same parameters
    monkeypatch.setenv("DISTBACKPROP_TEST_FAULTS", '{"nan_at": {"7": [0]}}')
    loc = _fit(tmp_path, "nanlocal", local=True)
    rel = np.linalg.norm(res.model.params - loc.model.params) / np.linalg.norm(loc.model.params)
    assert rel < 1e-6


def test_no_processes_left_after_train(ray_cluster, tmp_path):
    res = _fit(tmp_path, "clean", workers=2)
    assert res.summary["steps"] == 24
    _assert_gone(res.worker_pids, 2)
    assert os.path.exists(tmp_path / "clean" / "model.npz")
