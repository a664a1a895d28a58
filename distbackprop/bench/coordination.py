"""bench coordination: what a training step pays besides its math, in a steady run.

The reference MLP (784-1024-1024-10, Adam, float32), 2 Ray workers × 1 CPU, 256
examples per worker per step, default chunking and `--commit-seconds` (10 s), for
about a minute (~1100 steps; the `bench scaling` runs are too short to hold a
periodic commit). Per variant, medians over rounds, from each run's summary
(`coordination`):

* ``coordination_us/step``: Σ(chunk wall − Σ step time) / Σ steps over every chunk
  after the first — dispatch, hand-over between chunks, statistics, replica
  checksums and commits, everything but the steps themselves;
* ``chunk_ms``: what a chunk without a commit adds (median);
* ``commit_chunk_ms``: what a chunk that ships the state adds (checksums, and the
  state written into the shared-memory commit slots);
* ``steps/chunk`` and ``commits``.

The issue's target is ≤ 50 µs per step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

TITLE = ("coordination: per-step cost besides the math, reference MLP, 2 workers × 1 CPU, "
         "default chunks and commits, ~1 min runs")
TARGET_US = 50.0

VARIANTS = {
    "sharded update (the default)": dict(update_on="sharded"),
    "replicated update (--update-on workers)": dict(update_on="workers"),
}


def run(quick: bool = False) -> list[dict]:
    from ..runtime.raysession import local_ray
    from ..runtime.trainer import Trainer
    from .scaling import _config, _dataset

    steps = 120 if quick else 1100
    rounds = 1 if quick else 3
    variants = dict(list(VARIANTS.items())[:1]) if quick else VARIANTS
    found: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="dbp-bench-") as tmp, local_ray(num_cpus=2):
        data = _dataset(Path(tmp))
        for r in range(rounds):
            for name, kw in variants.items():
                out = Path(tmp) / f"{r}-{kw['update_on']}"
                summary = Trainer(_config(data, out, 2, steps, overlap=False, **kw)).fit().summary
                found[name].append({**summary["coordination"],
                                    "sps": summary["samples_per_second"]})
    rows = []
    for name, runs in found.items():
        def med(key: str, runs=runs) -> float | None:
            xs = [x[key] for x in runs if x[key] is not None]
            return float(np.median(xs)) if xs else None
        us = med("us_per_step")
        rows.append({"variant": name, "coordination_us/step": us,
                     "target_us": TARGET_US, "met": None if us is None else us <= TARGET_US,
                     "chunk_ms": med("chunk_ms"), "commit_chunk_ms": med("commit_chunk_ms"),
                     "steps/chunk": med("steps_per_chunk"), "commits": med("commits"),
                     "samples/s": med("sps"), "rounds": len(runs)})
    return rows
