"""bench soak: a small model for many steps, locally and with 2 workers; leaks show here.

After warm-up (the first 10% of chunks), the RSS of every worker process must
grow by less than 5%, and its open file descriptors and threads must stay
flat. Read from memory.parquet, which every run writes at each chunk end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

TITLE = "soak: 64-32-10 MLP on digits, RSS / fds / threads per worker after warm-up"


def soak(out: Path, steps: int, **kw) -> list[dict]:
    """Run `steps` steps; one row per worker: RSS growth after warm-up, fd and thread drift."""
    from ..config import TrainConfig
    from ..metrics.history import read_columns
    from ..runtime.trainer import Trainer
    cfg = TrainConfig(hidden=(32,), batch_size=32, max_steps=steps, quiet=True, metrics_port=0,
                      out=str(out), chunk_steps=max(50, steps // 100), **kw)
    res = Trainer(cfg).fit()
    mem = {k: v.tolist() for k, v in read_columns(out / "memory.parquet").items()}
    rows = []
    for w in sorted(set(mem["worker"])):
        idx = [i for i, x in enumerate(mem["worker"]) if x == w]
        rss = np.array([mem["rss_bytes"][i] for i in idx], dtype=float)
        fds = np.array([mem["open_fds"][i] for i in idx])
        thr = np.array([mem["threads"][i] for i in idx])
        warm = max(1, len(idx) // 10)
        q = max(1, (len(idx) - warm) // 4)
        # Drift: the last quarter's maximum over the first post-warm-up quarter's. A leak of
        # one handle per chunk grows by the number of chunks; Ray's own threads come and
        # go by one or two.
        rows.append({"mode": "local" if cfg.local else f"{cfg.workers} workers",
                     "worker": w, "steps": res.summary["steps"], "samples": len(idx),
                     "rss_after_warmup_MB": rss[warm] / 2**20, "rss_end_MB": rss[-1] / 2**20,
                     "rss_growth": rss[-1] / rss[warm] - 1.0,
                     "fds_drift": int(fds[-q:].max() - fds[warm:warm + q].max()),
                     "threads_drift": int(thr[-q:].max() - thr[warm:warm + q].max())})
    return rows


def run(quick: bool = False) -> list[dict]:
    steps = 2_000 if quick else 20_000
    with tempfile.TemporaryDirectory(prefix="dbp-soak-") as tmp:
        rows = soak(Path(tmp) / "local", steps, local=True)
        rows += soak(Path(tmp) / "ray", steps, workers=2)
    return rows
