"""bench scaling: weak scaling of the reference MLP over Ray workers, same run, medians.

Each worker keeps 256 examples per step (global batch 256·N) and 1 CPU, as
the 1-worker reference does, so perfect weak scaling is N× its samples/s.
Variants are run in interleaved rounds so drifting machine load hits all of
them alike: overlap on/off, the update on the workers vs on the coordinator,
and metrics on vs off. Also measured: start-up (command start to first step,
through the real CLI) and the coordination overhead per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TITLE = "scaling: reference MLP 784-1024-1024-10, 256 examples/worker/step, 1 CPU per worker"
PER_WORKER = 256


def _dataset(directory: Path, rows: int = 4096) -> Path:
    from ..data.tables import write_parquet
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 784)).astype(np.float32)
    y = rng.integers(0, 10, rows)
    cols = {f"f{i}": x[:, i] for i in range(784)}
    cols["target"] = y
    path = directory / "bench.parquet"
    write_parquet(path, cols)
    return path


def _run(data: Path, out: Path, workers: int, steps: int, **kw) -> dict:
    from ..config import TrainConfig
    from ..runtime.trainer import Trainer
    cfg = TrainConfig(data=str(data), hidden=(1024, 1024), batch_size=PER_WORKER * workers,
                      workers=workers, cpus_per_worker=1, max_steps=steps, quiet=True,
                      val_fraction=0.0, out=str(out), **{"metrics_port": 0, **kw})
    res = Trainer(cfg).fit()
    h = res.history
    step_s = h.column("step_seconds").to_numpy()
    warm = slice(min(5, len(step_s) - 1), None)
    s = res.summary
    return {
        "sps": s["samples_per_second"],
        "step_ms": float(np.median(step_s[warm])) * 1e3,
        "allreduce_ms": float(np.median(h.column("time/allreduce").to_numpy()[warm])) * 1e3,
        "overhead_us": (s["coordination_seconds_per_step"] or 0.0) * 1e6,
        "opt_MB": s["optimizer_bytes_per_worker"] / 1e6,
    }


def _startup_seconds(data: Path, out: Path) -> float:
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "distbackprop", "train", "--workers", "2",
                        "--data", str(data), "--hidden", "1024,1024", "--batch-size", "512",
                        "--max-steps", "4", "--metrics-port", "0", "--quiet", "--val-fraction",
                        "0", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"start-up run failed: {r.stderr[-500:]}")
    return float(json.loads((out / "summary.json").read_text())["startup_seconds"])


def run(quick: bool = False) -> list[dict]:
    from ..runtime.raysession import local_ray
    steps = 30 if quick else 120
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="dbp-bench-") as tmp:
        tmp_path = Path(tmp)
        data = _dataset(tmp_path)
        startups = [_startup_seconds(data, tmp_path / f"startup{i}") for i in range(rounds)]
        from ..metrics.exporter import MetricsExporter  # noqa: F401 - fail early if missing
        variants = {
            "1 worker": dict(workers=1),
            "2 workers": dict(workers=2, overlap=False),
            "2 workers, overlap": dict(workers=2, overlap=True),
            "2 workers, update on coordinator": dict(workers=2, update_on="coordinator"),
            "2 workers, sharded update (ZeRO-1)": dict(workers=2, update_on="sharded"),
            "2 workers, metrics on": dict(workers=2, metrics_port=_free_port()),
        }
        results: dict[str, list[dict]] = {k: [] for k in variants}
        with local_ray(num_cpus=max(2, os.cpu_count() or 2)):
            for r in range(rounds):
                for name, kw in variants.items():
                    kw = dict(kw)
                    w = kw.pop("workers")
                    if "metrics_port" in kw:
                        kw["metrics_port"] = _free_port()
                    results[name].append(_run(data, tmp_path / f"{name}-{r}".replace(" ", "_")
                                              .replace(",", ""), w, steps, **kw))
    med = {k: {f: float(np.median([x[f] for x in v])) for f in v[0]}
           for k, v in results.items()}
    base = med["1 worker"]["sps"]
    rows = []
    for name, m in med.items():
        n = 1 if name == "1 worker" else 2
        rows.append({"variant": name, "samples/s": m["sps"], "efficiency": m["sps"] / (n * base),
                     "step_ms": m["step_ms"], "allreduce_ms": m["allreduce_ms"],
                     "coordination_us/step": m["overhead_us"],
                     "optimizer_MB/worker": m["opt_MB"]})
    off, on = med["2 workers"], med["2 workers, metrics on"]
    rows.append({"variant": "metrics cost (on vs off, 2 workers)",
                 "samples/s": on["sps"], "efficiency": on["sps"] / off["sps"],
                 "step_ms": on["step_ms"] - off["step_ms"]})
    rows.append({"variant": "start-up to first step, 2 workers (CLI, median s)",
                 "samples/s": None, "efficiency": None,
                 "step_ms": float(np.median(startups)) * 1e3})
    return rows


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
