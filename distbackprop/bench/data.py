"""bench data: batches per second of the data plane against pyarrow's own read, same run.

A synthetic MNIST-shaped file (784 float32 features as a fixed-size-list column,
10 integer classes) is written to a temporary directory. Figures, medians of
repeated epochs:

* `Batcher` over the memory-mapped cache (the in-memory mode's path), for one
  process and for rank 0 of 2;
* `StreamingBatcher` reading row groups through its shuffle buffer;
* pyarrow's own reads of the same file: ``ParquetFile.iter_batches(256)``
  converted to NumPy (no shuffling), and ``read_table`` of the whole file
  (expressed per 256 rows);
* the data time per step at batch 256 as a share of the reference MLP's step
  (784-1024-1024-10): 6·B·Σ in·out FLOPs at this run's float32 GEMM rate
  (a 1024×1024 matmul). The issue's bound is 5%.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distbackprop.config import TrainConfig
from distbackprop.data import (
    Batcher,
    StreamingBatcher,
    load_training_data,
    open_cache,
    write_cache,
)

TITLE = "data: batches/s vs pyarrow's own read; data time per step vs the reference step"
SIZES = (784, 1024, 1024, 10)
BATCH = 256
LIMIT = 0.05


def _write_synthetic(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.random((rows, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], rows)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), SIZES[0]),
                      "target": pa.array(y)})
    pq.write_table(table, path, row_group_size=8192)


def _median_epoch(fn, repeats: int) -> float:
    fn()  # warm: page cache, permutation, buffers
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _gemm_rate(repeats: int) -> float:
    """float32 GEMM FLOP/s: 2·n³ over the median time of a 1024×1024 matmul."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    c = np.empty_like(a)
    for _ in range(3):
        np.matmul(a, b, out=c)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return 2.0 * 1024**3 / float(np.median(times))


def run(quick: bool = False) -> list[dict]:
    rows = 20_000 if quick else 60_000
    repeats = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="distbackprop-bench-data-") as tmp:
        path = Path(tmp) / "synthetic.parquet"
        _write_synthetic(path, rows)
        cfg = TrainConfig(data=str(path), dtype="float32", val_fraction=0.0, batch_size=BATCH)
        t0 = time.perf_counter()
        bundle = load_training_data(cfg)
        cache = write_cache(bundle, Path(tmp) / "cache")
        prepare_s = time.perf_counter() - t0
        x, y = open_cache(cache)
        del bundle

        def batcher_epoch(b: Batcher) -> None:
            for s in range(b.steps_per_epoch):
                b.batch(0, s)

        one = Batcher(x, y, BATCH, seed=0)
        half = Batcher(x, y, BATCH, seed=0, rank=0, world=2)
        steps = one.steps_per_epoch
        t_one = _median_epoch(lambda: batcher_epoch(one), repeats)
        t_half = _median_epoch(lambda: batcher_epoch(half), repeats)

        sbundle = load_training_data(cfg.replace(streaming=True))
        stream = StreamingBatcher(sbundle.stream, batch_size=BATCH, seed=0)

        epochs = iter(range(1_000_000))

        def stream_epoch() -> None:
            for _ in stream.epoch(next(epochs)):
                pass

        t_stream = _median_epoch(stream_epoch, max(1, repeats // 2))
        stream_steps = stream.steps_per_epoch
        stream.close()

        pf = pq.ParquetFile(path)

        def pyarrow_batches() -> None:
            for rb in pf.iter_batches(batch_size=BATCH, columns=["x", "target"]):
                col = rb.column(0)
                col.values.to_numpy().reshape(len(col), SIZES[0])
                rb.column(1).to_numpy()

        t_pa = _median_epoch(pyarrow_batches, repeats)
        t_read = _median_epoch(lambda: pq.read_table(path), repeats)
        read_steps = -(-rows // BATCH)

    rate = _gemm_rate(20 if quick else 50)
    flops = 6.0 * BATCH * sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:], strict=True))
    ref_s = flops / rate
    pa_bps = steps / t_pa
    data_s = t_one / steps

    def row(measure: str, bps: float, reference: str, relative: float | None = None) -> dict:
        return {"measure": measure, "batches_per_s": bps, "ms_per_batch": 1e3 / bps,
                "relative": bps / pa_bps if relative is None else relative,
                "reference": reference}

    return [
        row("Batcher, mmap cache, 1 rank (shuffled, B=256)", steps / t_one,
            "pyarrow iter_batches(256)"),
        row("Batcher, mmap cache, rank 0 of 2 (128 rows)", steps / t_half,
            "pyarrow iter_batches(256)"),
        row("StreamingBatcher, row groups + shuffle buffer", stream_steps / t_stream,
            "pyarrow iter_batches(256)"),
        row("pyarrow iter_batches(256) + to_numpy (no shuffle)", pa_bps, "itself"),
        row("pyarrow read_table, whole file, per 256 rows", read_steps / t_read,
            "pyarrow iter_batches(256)"),
        {"measure": f"prepare: read+check+standardize+cache {rows} rows", "batches_per_s": None,
         "ms_per_batch": None, "relative": None,
         "reference": f"{prepare_s:.2f} s once per run (read_table alone {t_read:.2f} s)"},
        {"measure": "data time / reference step (B=256, 1 rank)", "batches_per_s": None,
         "ms_per_batch": data_s * 1e3, "relative": data_s / ref_s,
         "reference": f"step {ref_s * 1e3:.2f} ms = 6·B·Σin·out at {rate / 1e9:.0f} GFLOP/s "
                      f"(GEMM, same run); bound {LIMIT:.0%}"},
    ]
