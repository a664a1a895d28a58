"""Memory accounting: RSS and peak in bytes, model bytes by kind."""

from __future__ import annotations

import numpy as np
import psutil

from distbackprop.metrics.memory import model_bytes, peak_rss_bytes, process_memory, rss_bytes


def test_rss_matches_psutil_and_peak_is_in_bytes():
    before = rss_bytes()
    assert abs(before - psutil.Process().memory_info().rss) < 64 * 2**20
    block = np.ones(64 * 2**20 // 8)          # 64 MiB, touched
    held = rss_bytes()
    assert held >= before + 48 * 2**20
    # ru_maxrss is in KiB on Linux: a unit slip would put the peak far below the RSS
    assert peak_rss_bytes() >= held - 4 * 2**20
    m = process_memory()
    assert m["peak_rss_bytes"] >= m["rss_bytes"] >= before
    del block


def test_model_bytes_by_kind():
    params = np.zeros(1000, dtype=np.float32)
    grads = np.zeros(1000, dtype=np.float32)
    adam = {"m": np.zeros(1000, dtype=np.float32), "v": np.zeros(1000, dtype=np.float32)}
    assert model_bytes(params, grads, adam) == {"params": 4000, "grads": 4000,
                                                 "optimizer": 8000}
    assert model_bytes(params, grads, {})["optimizer"] == 0
    assert model_bytes(params, grads, None)["optimizer"] == 0
    with_step = model_bytes(params, grads, {"m": adam["m"], "t": np.int64(3)})
    assert with_step["optimizer"] == 4008
