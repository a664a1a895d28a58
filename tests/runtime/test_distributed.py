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


def _mpiexec2(*argv: str) -> None:
    """Run `mpiexec -n 2 python *argv` to the end (2 min at most; the whole process group
    is killed on a timeout) and assert it exited 0."""
    import signal
    import subprocess
    import sys

    from tests.conftest import require_tool
    proc = subprocess.Popen([require_tool("mpiexec"), "-n", "2", sys.executable, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err


def _assert_equals_local(model_path, local_result) -> None:
    from distbackprop.nn import load_model
    m = load_model(model_path)
    ref = local_result.model.params
    assert np.linalg.norm(m.params - ref) / np.linalg.norm(ref) < 1e-10


@pytest.mark.mpi
@pytest.mark.parametrize("update_on", ["workers", "sharded"])
def test_mpiexec_launcher_equals_local(local_result, tmp_path, update_on):
    """`mpiexec -n 2 python -m distbackprop train --launcher mpi`: no Ray, same result."""
    out = tmp_path / "mpi"
    args = ["--hidden", "16", "--dtype", "float64", "--max-steps", "24", "--batch-size", "50",
            "--seed", "3", "--metrics-port", "0", "--quiet", "--chunk-steps", "5",
            "--val-fraction", "0.1", "--update-on", update_on, "--out", str(out)]
    _mpiexec2("-m", "distbackprop", "train", "--launcher", "mpi", *args)
    _assert_equals_local(out / "model.npz", local_result)
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2
    # sharded, both ranks on this machine: θ and gradients shared, and each rank says so
    assert summary["gradient_exchange"] == ("shm" if update_on == "sharded" else "mpi")
    from distbackprop.metrics.history import read_columns
    mem = read_columns(out / "memory.parquet")
    shared = {int(w): int(b) for w, b in zip(mem["worker"], mem["shared_bytes"], strict=True)}
    assert sorted(shared) == [0, 1]
    assert all((b > 0) == (update_on == "sharded") for b in shared.values()), shared


MPI_API_SCRIPT = """
import json, os, sys
from distbackprop import TrainConfig, Trainer
cfg = TrainConfig(**json.loads(sys.argv[1]))
res = Trainer(cfg).fit()
ray = sys.modules.get("ray")
with open(os.path.join(sys.argv[2], "rank-" + os.environ["PMI_RANK"] + ".json"), "w") as f:
    json.dump({"result": res is not None, "ray": bool(ray and ray.is_initialized()),
               "workers": res.summary["workers"] if res else None}, f)
"""


@pytest.mark.mpi
def test_trainer_api_honours_launcher_mpi(local_result, tmp_path):
    """`Trainer(TrainConfig(launcher="mpi")).fit()` on every rank of `mpiexec -n 2` runs
    the MPI launcher (it used to start Ray and ignore it): rank 0 gets the Result, the
    other rank None, no rank starts Ray, and the model is the one-process result."""
    import json
    out = tmp_path / "api"
    cfg = {**BASE, "hidden": [16], "launcher": "mpi", "workers": 2, "out": str(out)}
    _mpiexec2("-c", MPI_API_SCRIPT, json.dumps(cfg), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"result": True, "ray": False, "workers": 2},
                     {"result": False, "ray": False, "workers": None}]
    _assert_equals_local(out / "model.npz", local_result)


def test_trainer_api_rejects_launcher_mpi_with_local(tmp_path):
    from distbackprop.errors import ConfigError
    with pytest.raises(ConfigError, match="launcher: mpi cannot be combined with --local"):
        Trainer(TrainConfig(**{**BASE, "launcher": "mpi", "local": True,
                               "out": str(tmp_path / "x")})).fit()
    assert not (tmp_path / "x").exists()


def test_streaming_with_two_workers_trains(ray_cluster, tmp_path):
    """--streaming: each rank reads only its row groups; equal step counts, so no hang."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 6))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(6)}, "target": y}), path,
                   row_group_size=250)
    res = _fit(tmp_path, "stream", workers=2, streaming=True, data=str(path), epochs=4,
               max_steps=None, batch_size=32, dtype="float32", chunk_steps=None)
    assert res.summary["val_accuracy"] > 0.9
    from distbackprop.data import StreamingBatcher, load_training_data
    cfg = TrainConfig(data=str(path), streaming=True, batch_size=32, workers=2, seed=3,
                      val_fraction=0.1)
    plan = load_training_data(cfg).stream
    spe = {StreamingBatcher(plan, batch_size=32, seed=3, rank=r, world=2).steps_per_epoch
           for r in range(2)}
    assert len(spe) == 1  # every rank takes the same number of steps
    assert res.summary["steps"] == 4 * spe.pop()


def test_diverged_replica_fails_the_run_clearly(ray_cluster, tmp_path, monkeypatch):
    from distbackprop.runtime.coordinator import TrainingFailed
    monkeypatch.setenv("DISTBACKPROP_TEST_FAULTS", '{"perturb_at": {"6": [1]}}')
    # replicated update: under the sharded one the Allgather re-syncs every replica from
    # each block's owner, so a perturbed copy cannot stay apart
    with pytest.raises(TrainingFailed, match="replicas diverged.*rank 1"):
        _fit(tmp_path, "diverge", workers=2, update_on="workers")


def test_sharpness_and_remat_match_local(ray_cluster, local_result, tmp_path):
    """--sharpness-every (allreduced HVPs) and --remat-every across 2 workers = one process."""
    loc = _fit(tmp_path, "sl", local=True, sharpness_every=8)
    dist = _fit(tmp_path, "sd", workers=2, sharpness_every=8, remat_every=2)
    # neither option changes the training itself
    np.testing.assert_array_equal(loc.model.params, local_result.model.params)
    rel = (np.linalg.norm(dist.model.params - local_result.model.params)
           / np.linalg.norm(local_result.model.params))
    assert rel < 1e-10
    a = loc.history.column("sharpness").to_numpy()
    b = dist.history.column("sharpness").to_numpy()
    measured = np.isfinite(a)
    assert list(np.flatnonzero(measured)) == [0, 8, 16]
    np.testing.assert_array_equal(measured, np.isfinite(b))
    np.testing.assert_allclose(a[measured], b[measured], rtol=1e-5)
    assert np.all(a[measured] > 0)
