"""`--update-on sharded` (ZeRO-1): the same training as replicated and as one process.

Float64, so the only differences are float summation orders. The reference MLP here has
16·64+16 + 10·16+10 = 1210 parameters: over 3 workers the blocks are 404, 403, 403, so
layer dense0 (1040 entries) straddles all three blocks and dense1 lies in the last.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from distbackprop import TrainConfig, Trainer

pytestmark = pytest.mark.ray

BASE = dict(hidden=(16,), dtype="float64", max_steps=30, batch_size=50, seed=3,
            metrics_port=0, quiet=True, chunk_steps=7, val_fraction=0.1, clip_norm=0.5,
            weight_decay=0.01)


def _fit(tmp_path, name, **kw):
    return Trainer(TrainConfig(**{**BASE, **kw, "out": str(tmp_path / name)})).fit()


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
@pytest.mark.parametrize("workers", [2, 3])
def test_sharded_equals_replicated_and_local(ray_cluster, tmp_path, monkeypatch, workers,
                                             optimizer):
    # a non-finite gradient on one rank at step 11: skipped on every rank, in every mode
    monkeypatch.setenv("DISTBACKPROP_TEST_FAULTS", json.dumps({"nan_at": {"11": [workers - 1]}}))
    sh = _fit(tmp_path, "sh", workers=workers, update_on="sharded", optimizer=optimizer)
    runs = [sh]
    if workers == 3:  # the same without the shared θ and gradients: Reduce_scatter +
        # Allgather (over 2 workers, tests/multinode runs it between two nodes)
        runs.append(_fit(tmp_path, "sh_mpi", workers=workers, update_on="sharded",
                         optimizer=optimizer, node_shm=False))
        assert runs[-1].summary["gradient_exchange"] == "mpi"
    rep = _fit(tmp_path, "rep", workers=workers, update_on="workers", optimizer=optimizer)
    monkeypatch.setenv("DISTBACKPROP_TEST_FAULTS", '{"nan_at": {"11": [0]}}')
    loc = _fit(tmp_path, "loc", local=True, optimizer=optimizer)
    assert sh.summary["gradient_exchange"] == "shm"  # one machine: the shared path ran
    assert rep.summary["gradient_exchange"] == "mpi"
    assert loc.summary["gradient_exchange"] == "none"
    for run in runs:
        assert _rel(run.model.params, loc.model.params) < 1e-10
        assert _rel(run.model.params, rep.model.params) < 1e-10
        h_sh, h_rep = run.history, rep.history
        assert list(np.flatnonzero(h_sh.column("skipped").to_numpy())) == [11]
        for col in h_rep.column_names:
            if col.startswith(("grad_norm/", "update_ratio/")) or col == "grad_global_norm":
                np.testing.assert_allclose(h_sh.column(col).to_numpy(),
                                           h_rep.column(col).to_numpy(),
                                           rtol=1e-12, atol=0, err_msg=col)


def test_sharded_resume_with_another_worker_count(ray_cluster, tmp_path):
    """A 2-worker sharded checkpoint resumed by 3 workers = a 3-worker run from that state."""
    full = _fit(tmp_path, "full", workers=2, update_on="sharded", checkpoint_every=12,
                keep_checkpoints=5)
    run = tmp_path / "full"
    import shutil
    for step in (24,):  # keep the checkpoint at 12 only: resume continues from there
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}", ignore_errors=True)
    shutil.rmtree(run / "checkpoints" / "step-00000030", ignore_errors=True)
    resumed = Trainer(TrainConfig(**{**BASE, "workers": 3, "update_on": "sharded",
                                     "resume": str(run)})).fit()
    assert resumed.summary["steps"] == 30
    assert _rel(resumed.model.params, full.model.params) < 1e-10


def test_one_sharded_worker_updates_from_its_own_gradient_buffer():
    """One worker's gradient is the sum: the sharded path takes it as it is (no copy) and
    trains like the replicated update, clipping and weight decay on."""
    from distbackprop.runtime.worker import ReplicaSpec, Worker
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 64)), rng.integers(0, 10, 200)
    cfg = TrainConfig(**{**BASE, "workers": 1})
    runs = {}
    for mode in ("sharded", "workers"):
        w = Worker(ReplicaSpec(cfg.replace(update_on=mode), 64, 10, "cross_entropy", 30),
                   0, 1, x, y)
        w.run_chunk(0, 12, 0)
        runs[mode] = w
    sh = runs["sharded"]
    assert np.shares_memory(sh._sharded_grad.grads, sh.model.grads)
    assert _rel(sh.model.params, runs["workers"].model.params) < 1e-12


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_worker_holds_its_block_of_the_optimizer_state(world):
    from distbackprop.runtime.worker import ReplicaSpec, Worker
    cfg = TrainConfig(**{**BASE, "update_on": "sharded", "workers": world})
    spec = ReplicaSpec(cfg, 64, 10, "cross_entropy", 30)
    x, y = np.zeros((8, 64)), np.zeros(8, np.int64)
    sizes = [Worker(spec, r, world, x, y).rule.state_bytes() for r in range(world)]
    full = Worker(ReplicaSpec(cfg.replace(update_on="workers"), 64, 10, "cross_entropy", 30),
                  0, 1, x, y).rule.state_bytes()
    step_counter = 8  # Adam's t, held whole by every rank
    assert sum(s - step_counter for s in sizes) == full - step_counter
    per_param = 2 * 8  # m and v, float64
    assert max(sizes) - step_counter <= -(-1210 // world) * per_param  # a block: ⌈P/N⌉ params
