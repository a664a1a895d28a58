"""A straight-through network trained by 2 Ray workers equals the one-process run: the
surrogate backward is elementwise in each row, so sharding the batch changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop import TrainConfig, Trainer

pytestmark = pytest.mark.ray

BASE = dict(hidden=(16,), dtype="float64", max_steps=24, batch_size=50, seed=3,
            metrics_port=0, quiet=True, chunk_steps=5, val_fraction=0.1, activation="sign")


def test_sign_workers_equal_local(ray_cluster, tmp_path) -> None:
    local = Trainer(TrainConfig(**BASE, local=True, out=str(tmp_path / "l"))).fit()
    dist = Trainer(TrainConfig(**BASE, workers=2, out=str(tmp_path / "w"))).fit()
    ref, got = local.model.params, dist.model.params
    assert local.model.activation == dist.model.activation == "sign"
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-10
    np.testing.assert_allclose(dist.history.column("loss").to_numpy(),
                               local.history.column("loss").to_numpy(), rtol=1e-9)
