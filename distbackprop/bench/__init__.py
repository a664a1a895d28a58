"""`distbackprop bench`: each figure printed beside what it was measured against, same run.

Every benchmark module exposes ``TITLE`` and ``run(quick=False) -> list[dict]``;
rows print as a table (or JSON with ``--json``). Medians of repeats: these
machines are shared and noisy.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ALL = ("compute", "data", "allreduce", "rendezvous", "scaling", "coordination", "soak", "memory",
       "hvp", "rnn", "nodeloss")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def with_blas_threads(n: int, fn: Callable[[], list[dict]]) -> list[dict]:
    """Run `fn` with BLAS limited to `n` threads (a worker's --cpus-per-worker default is 1)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=n, user_api="blas"):
        return fn()


def harness(stack: contextlib.ExitStack, root: Path,
            nodes: tuple[str, ...]) -> tuple[Any, str | None]:
    """(a rehearsed cluster on this machine, `runtime.localcluster`: a head with 0 CPUs and
    worker nodes `nodes` with 1 CPU each, stopped when `stack` closes; None) — or (None,
    why it cannot run here), for a row that says so instead of failing the bench."""
    from ..runtime.localcluster import Cluster, package_env, unavailable
    why = unavailable()
    if why is not None:
        return None, why
    for attempt in range(2):  # `ray start` gives a node 30 s to register: a swamped machine
        cluster = Cluster(root / f"attempt{attempt}", env=package_env())
        try:
            cluster.start_head()
            cluster.add_nodes(list(nodes))
        except Exception as exc:  # noqa: BLE001 - the row says why; the other rows stand
            cluster.stop()
            why = f"the harness did not start: {type(exc).__name__}: {one_line(exc)}"
            continue
        stack.callback(cluster.stop)
        return cluster, None
    return None, why


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An error for a table cell: its first line and, if longer, its last (a log's tail)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0][:limit // 2]} … {lines[-1]}"
    return text[:limit]


def format_table(title: str, rows: list[dict]) -> str:
    if not rows:
        return f"## {title}\n(no rows)\n"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
            for row in cells]
    return "\n".join([f"## {title}", "", line, sep, *body, ""])


def main(which: str = "all", as_json: bool = False, quick: bool = False) -> int:
    names = ALL if which == "all" else (which,)
    out = {}
    for name in names:
        mod = importlib.import_module(f"distbackprop.bench.{name}")
        rows = mod.run(quick=quick)
        out[name] = rows
        if not as_json:
            print(format_table(mod.TITLE, rows), flush=True)
    if as_json:
        json.dump(out, sys.stdout, indent=2, default=float)
        print()
    return 0
