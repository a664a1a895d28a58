"""What this machine allows two ranks in lockstep: a loop alone, then in two processes at
once, one BLAS thread each, no Ray, no MPI.

A data-parallel pair runs at the pace of its slower rank at every step, so the ceiling
of its weak-scaling efficiency is

    ceiling = t_alone / max(t_a, t_b)

with t_alone timed with the other core idle and t_a, t_b in the two processes running
over the same seconds. Two loops (`LOOPS`):

- ``matmul``: the median time of one 256×1024 @ 1024×1024 float32 matmul (the reference
  MLP's largest layer), none of the project's code: the machine's compute alone;
- ``step``: the mean time of the whole reference step as a worker runs it (forward,
  loss and backward, the Adam update; `compute.reference_step`): the GEMMs with the
  step's streaming parts, whose memory bandwidth two processes share.

Both are upper bounds (the pair here only shares the seconds, not a barrier per step).
On a virtual machine whose two vCPUs change speed independently they are often below 1
(`BENCHMARKS.md`).

Run as ``python -m distbackprop.bench.lockstep START END [KIND]`` it runs loop KIND
(default ``matmul``) from the Unix time START to END and prints its figure in ms.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

SECONDS = 4.0  # of loops per process, per measurement
# s for the processes to start (Python + NumPy; for the step, the model and the update's
# compiled kernels) before the timed window
START = {"matmul": 1.5, "step": 4.0}


def _timed_from(start: float, end: float, fn) -> list[float]:
    """Seconds of each `fn()` call, called from the Unix time `start` (so processes begin
    together) until `end` (at least once)."""
    while time.time() < start:
        time.sleep(0.01)
    times = []
    while time.time() < end or not times:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


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
    return float(np.median(_timed_from(start, end, lambda: np.matmul(a, b, out=c)))) * 1e3


def step_mean_ms(start: float, end: float) -> float:
    """The mean ms of the reference step (`compute.reference_step`, one BLAS thread and
    one update thread), repeated from the Unix time `start` until `end` — the mean, as a
    run's samples/s follows it."""
    from threadpoolctl import threadpool_limits

    from ..kernels import set_threads
    from .compute import reference_step
    threadpool_limits(limits=1)
    set_threads(1)
    _, _, one_step = reference_step(threads=1)
    for _ in range(3):  # compiled, in cache, BLAS warm
        one_step()
    return float(np.mean(_timed_from(start, end, one_step))) * 1e3


LOOPS = {"matmul": gemm_median_ms, "step": step_mean_ms}


def _at_once(n: int, seconds: float, kind: str = "matmul") -> list[float]:
    """`n` processes running loop `kind` over the same `seconds`: each one's figure (ms)."""
    start = time.time() + START[kind]
    procs = [subprocess.Popen([sys.executable, "-m", __name__, repr(start), repr(start + seconds),
                               kind],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=START[kind] + seconds + 120)
            if p.returncode != 0:
                raise RuntimeError(f"the {kind} loop exited {p.returncode}: {stderr[-300:]}")
            out.append(float(stdout.strip().splitlines()[-1]))
    finally:  # none left running, whatever failed
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def ceiling(seconds: float = SECONDS, kind: str = "matmul") -> dict[str, float]:
    """Loop `kind` in one process alone, then in two at once: {"alone_ms", "slower_ms",
    "ceiling"}."""
    (alone,) = _at_once(1, seconds, kind)
    slower = max(_at_once(2, seconds, kind))
    return {"alone_ms": alone, "slower_ms": slower, "ceiling": alone / slower}


if __name__ == "__main__":
    print(LOOPS[sys.argv[3] if len(sys.argv) > 3 else "matmul"](float(sys.argv[1]),
                                                                 float(sys.argv[2])))
