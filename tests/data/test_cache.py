"""The memory-mapped cache: zero-copy views, atomic writes, shared by worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distbackprop.data import (
    Batcher,
    DataBundle,
    DataError,
    load_training_data,
    open_cache,
    write_cache,
)
from tests.data.conftest import cfg

psutil = pytest.importorskip("psutil")
REPO = Path(__file__).resolve().parents[2]


def _bundle(x: np.ndarray, y: np.ndarray, task: str = "classification") -> DataBundle:
    d = x.shape[1]
    return DataBundle(x_train=x, y_train=y, x_val=None, y_val=None, task=task, n_features=d,
                      n_outputs=10 if task == "classification" else y.shape[1], classes=None,
                      feature_names=["x"], target_names=["target"], mean=np.zeros(d),
                      std=np.ones(d), source="test", feature_widths=[d], dtype=x.dtype.name,
                      n_train=len(x))


def test_open_cache_gives_zero_copy_readonly_views(tmp_path):
    b = load_training_data(cfg(None, dtype="float32", standardize=True))
    path = write_cache(b, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["train.arrow"]  # no temporary left over
    x, y = open_cache(path)
    assert x.shape == b.x_train.shape and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, b.x_train)
    np.testing.assert_array_equal(y, b.y_train)
    for a in (x, y):
        assert not a.flags.owndata and not a.flags.writeable and a.flags.c_contiguous
    # the view points into the mapped file: its address lies inside the file's mapping
    maps = [m for m in psutil.Process().memory_maps(grouped=False)
            if m.path == str(path.resolve())]
    assert maps
    addr = x.__array_interface__["data"][0]
    spans = [tuple(int(v, 16) for v in m.addr.split("-")) for m in maps]
    assert any(lo <= addr < hi for lo, hi in spans)
    # the Batcher works on the read-only mapped arrays
    lx, ly, count = Batcher(x, y, 64, seed=0, rank=1, world=2).batch(0, 0)
    assert count == 64 and lx.shape == (32, 64)


def test_regression_cache(tmp_path):
    x = np.arange(30, dtype=np.float64).reshape(10, 3)
    y = np.arange(20, dtype=np.float64).reshape(10, 2)
    xc, yc = open_cache(write_cache(_bundle(x, y, "regression"), tmp_path))
    np.testing.assert_array_equal(xc, x)
    np.testing.assert_array_equal(yc, y)
    assert not yc.flags.owndata


def test_cache_errors(tmp_path):
    streaming = load_training_data(cfg(None, streaming=True))
    with pytest.raises(DataError, match="streaming"):
        write_cache(streaming, tmp_path)
    bogus = tmp_path / "bogus.arrow"
    bogus.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"cannot open .*bogus\.arrow"):
        open_cache(bogus)


_WORKER = """
import sys, numpy as np, psutil
from distbackprop.data import open_cache
proc = psutil.Process()
before = proc.memory_full_info().uss
x, y = open_cache(sys.argv[1])
if sys.argv[2] == "copy":
    x = np.array(x)
total = float(x.sum(dtype=np.float64)) + float(y.sum())  # touch every page
print("ready", flush=True)
sys.stdin.readline()  # measure only once every worker has mapped and touched the file
after = proc.memory_full_info().uss
print(before, after, total, flush=True)
sys.stdin.readline()
"""


def _start(path: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(path), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _measure(procs: list[subprocess.Popen]) -> list[int]:
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("\n")
            p.stdin.flush()
        growth = []
        for p in procs:
            before, after, _ = p.stdout.readline().split()
            growth.append(int(after) - int(before))
        for p in procs:
            p.stdin.write("\n")
            p.stdin.flush()
            p.wait(timeout=30)
        return growth
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_worker_processes_share_the_mapped_cache(tmp_path):
    rows, d = 64_000, 784  # 64,000 × 784 float32 ≈ 200 MB
    x = np.full((rows, d), 0.5, dtype=np.float32)
    y = np.arange(rows, dtype=np.int64) % 10
    path = write_cache(_bundle(x, y), tmp_path)
    del x
    size = path.stat().st_size
    assert size > 200e6
    # USS (private memory) is read while both workers map the file: a page mapped by one
    # process only counts as its private page, a page mapped by both is shared
    growth = _measure([_start(path, "mmap"), _start(path, "mmap")])
    assert all(g < 0.1 * size for g in growth), (growth, size)
    # the control shows the measure can fail: a worker that copies pays the full size
    (copied,) = _measure([_start(path, "copy")])
    assert copied > 0.9 * size, (copied, size)
