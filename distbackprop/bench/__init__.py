"""`distbackprop bench`: each figure printed beside what it was measured against, same run.

Every benchmark module exposes ``TITLE`` and ``run(quick=False) -> list[dict]``;
rows print as a table (or JSON with ``--json``). Medians of repeats: these
machines are shared and noisy.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable

import numpy as np

ALL = ("compute", "data", "allreduce", "rendezvous", "scaling", "soak", "memory", "hvp",
       "rnn")


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
