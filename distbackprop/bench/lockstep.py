"""What this machine allows two ranks in lockstep: the reference GEMM alone, then in two
processes at once, one BLAS thread each, no Ray, no MPI, none of the project's code.

A data-parallel pair runs at the pace of its slower rank at every step, so the ceiling
of its weak-scaling efficiency, for the compute, is

    ceiling = t_alone / max(t_a, t_b)

with t the median time of one 256×1024 @ 1024×1024 float32 matmul (the reference MLP's
largest layer) over a few seconds: t_alone with the other core idle, t_a and t_b in the
two processes running at the same time. It is an upper bound (the pair here only shares
the seconds, not a barrier per matmul). On a virtual machine whose two vCPUs change
speed independently it is often below 1 (`BENCHMARKS.md`).

Run as ``python -m distbackprop.bench.lockstep START END`` it times matmuls from the Unix
time START to END and prints the median in ms.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

SECONDS = 4.0  # of matmuls per process, per measurement
START = 1.5  # s for the processes to start (Python + NumPy) before the timed window


def gemm_median_ms(start: float, end: float, rows: int = 256, inner: int = 1024,
                   cols: int = 1024) -> float:
    """The median ms of a (rows × inner) @ (inner × cols) float32 matmul on one BLAS thread,
    repeated from the Unix time `start` (so processes begin together) until `end`."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner)).astype(np.float32)
    b = rng.standard_normal((inner, cols)).astype(np.float32)
    c = np.empty((rows, cols), np.float32)
    while time.time() < start:
        time.sleep(0.01)
    times = []
    while time.time() < end or not times:
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def _at_once(n: int, seconds: float) -> list[float]:
    """`n` processes timing matmuls over the same `seconds`: each one's median ms."""
    start = time.time() + START
    procs = [subprocess.Popen([sys.executable, "-m", __name__, repr(start), repr(start + seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=START + seconds + 120)
            if p.returncode != 0:
                raise RuntimeError(f"the matmul loop exited {p.returncode}: {stderr[-300:]}")
            out.append(float(stdout.strip().splitlines()[-1]))
    finally:  # none left running, whatever failed
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def ceiling(seconds: float = SECONDS) -> dict[str, float]:
    """One process alone, then two at once: {"alone_ms", "slower_ms", "ceiling"}."""
    (alone,) = _at_once(1, seconds)
    slower = max(_at_once(2, seconds))
    return {"alone_ms": alone, "slower_ms": slower, "ceiling": alone / slower}


if __name__ == "__main__":
    print(gemm_median_ms(float(sys.argv[1]), float(sys.argv[2])))
