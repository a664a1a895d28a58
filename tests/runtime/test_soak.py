"""A short soak: memory, file descriptors and threads stay flat (`bench soak` runs 20,000 steps)."""

from __future__ import annotations

import pytest

from distbackprop.bench.soak import soak


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "workers"])
def test_short_soak_is_flat(ray_cluster, tmp_path, mode):
    kw = {"local": True} if mode == "local" else {"workers": 2}
    rows = soak(tmp_path / mode, 3000, **kw)
    assert len(rows) == (1 if mode == "local" else 2)
    for r in rows:
        assert r["steps"] == 3000
        assert r["rss_growth"] < 0.05, r
        # a leak per chunk would grow by ~the number of chunks (here 60)
        assert r["samples"] >= 50, r
        assert r["fds_drift"] <= 2, r
        assert r["threads_drift"] <= 2, r
