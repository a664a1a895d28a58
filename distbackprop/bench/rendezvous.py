"""bench rendezvous: forming the MPI group by recursive doubling vs one newcomer at a time.

What `RayGroup.start` pays for its MPI group, measured on the driver: the wall time from
issuing `open_ports` on every actor to every rank's `join` returning (two rounds of Ray
calls around the MPI rendezvous). For N = 2, 4, 8 ranks, N Ray actors of 0.25 CPU each
(8 × 0.25 = the 2 CPUs of the private Ray instance) are started once and reused: each
round forms a group with each schedule and closes it (`MpiComm.close`), the schedules'
order alternating from round to round so drifting machine load hits both alike. One
warm-up round per schedule first (MPI initialisation, first connections).

- `sequential`: the old schedule, N−1 rounds: ranks [0, k) accept rank k, k = 1..N−1.
- `doubling`: recursive doubling, ⌈log₂ N⌉ rounds of independent pairwise merges.

Times are medians over rounds (15 at N = 8, more for smaller N); `sequential/doubling`
is the median of the per-round ratios of the two back-to-back formations. At N = 2 both
schedules are the same single Accept/Connect, so that row's ratio shows the noise.
"""

from __future__ import annotations

import time

import numpy as np

from ..comm.rendezvous import SCHEDULES, rounds

TITLE = "rendezvous: MPI group formation, sequential vs recursive doubling (actors × 0.25 CPU)"
SIZES = (2, 4, 8)
CPUS_PER_ACTOR = 0.25
TIMEOUT = 60.0


class RendezvousBenchWorker:
    """Plain class behind the benchmark's Ray actor: one rank, reused for many groups."""

    def __init__(self) -> None:
        self.comm = None

    def ready(self) -> bool:
        return True

    def open_ports(self, rank: int, size: int, schedule: str) -> str:
        from ..comm.mpi import open_ports
        return open_ports(rank, size, schedule)

    def join(self, ports: list[str], rank: int, size: int, timeout: float,
             schedule: str) -> int:
        from ..comm.mpi import join
        self.comm = join(ports, rank, size, timeout, schedule)
        return self.comm.rank

    def close(self) -> None:
        self.comm.close()
        self.comm = None


def _form(actors, size: int, schedule: str) -> float:
    """Seconds from the first `open_ports` call to the last `join` result; then close."""
    t0 = time.perf_counter()
    ports = actors.call("open_ports", each=[(r, size, schedule) for r in range(size)],
                        timeout=TIMEOUT)
    ranks = actors.call("join", each=[(ports, r, size, TIMEOUT, schedule)
                                      for r in range(size)], timeout=TIMEOUT + 30)
    seconds = time.perf_counter() - t0
    if ranks != list(range(size)):
        raise RuntimeError(f"{schedule} rendezvous of {size} gave ranks {ranks}")
    actors.call("close", timeout=60)
    return seconds


def _measure(size: int, repeats: int) -> dict[str, list[float]]:
    """Per-schedule formation times over `repeats` interleaved rounds, on fresh actors."""
    from ..runtime.raysession import Actors
    actors = Actors(RendezvousBenchWorker, size, num_cpus=CPUS_PER_ACTOR)
    try:
        actors.call("ready", timeout=120)
        for schedule in SCHEDULES:  # warm-up
            _form(actors, size, schedule)
        times: dict[str, list[float]] = {s: [] for s in SCHEDULES}
        for i in range(repeats):
            for schedule in SCHEDULES if i % 2 == 0 else SCHEDULES[::-1]:
                times[schedule].append(_form(actors, size, schedule))
        return times
    finally:
        actors.close()


def run(quick: bool = False) -> list[dict]:
    from ..runtime.raysession import local_ray

    rows: list[dict] = []
    with local_ray(num_cpus=2):
        for size in SIZES:
            # Small groups form in milliseconds, where a loaded machine's noise is largest:
            # more rounds for them, at about the same total time per size.
            t = _measure(size, (5 if quick else 15) * (max(SIZES) // size))
            seq, dbl = np.asarray(t["sequential"]), np.asarray(t["doubling"])
            rows.append({
                "ranks": size,
                "rounds_sequential": rounds(size, "sequential"),
                "rounds_doubling": rounds(size, "doubling"),
                "sequential_ms": float(np.median(seq)) * 1e3,
                "doubling_ms": float(np.median(dbl)) * 1e3,
                "sequential/doubling": float(np.median(seq / dbl)),
            })
    return rows
