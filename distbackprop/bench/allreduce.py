"""bench allreduce: the project's `allreduce_` against raw mpi4py and against Ray's object store.

Two Ray actors (1 CPU each) form an `MpiComm` by the same rendezvous training uses. For
each size (float32), inside the same actors on the same buffers, interleaved:

- `project`: `comm.allreduce_(buf)` (in place, SUM);
- `raw`: `comm.mpi_comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)`, plain mpi4py;
- `ray`: what a Ray user without MPI writes: each actor returns its gradient (into the
  object store), the driver sums them, `ray.put`s the sum and every actor copies it back.

Small sizes time a batch of calls and divide (one call is ~1 µs, below timer noise);
every batch starts after a barrier. Times are medians over repeats, on rank 0;
`project/raw` is the median of the per-repeat ratios of back-to-back batches.
"""

from __future__ import annotations

import time

import numpy as np

TITLE = "allreduce: project allreduce_ vs raw mpi4py Allreduce vs Ray object store (2 actors)"
SIZES = (10, 1_000, 100_000, 1_000_000, 4_000_000)
RENDEZVOUS_TIMEOUT = 60.0


class AllreduceBenchWorker:
    """Plain class behind the benchmark's Ray actor (the actor is a thin shell around it)."""

    def __init__(self) -> None:
        self.comm = None
        self.buf = np.zeros(0, dtype=np.float32)

    def open_ports(self, rank: int, size: int) -> str:
        from ..comm.mpi import open_ports
        return open_ports(rank, size)

    def join(self, ports: list[str], rank: int, size: int, timeout: float) -> int:
        from ..comm.mpi import join
        self.comm = join(ports, rank, size, timeout)
        return self.comm.rank

    def time_mpi(self, n: int, repeats: int, inner: int) -> dict:
        """Median seconds per call of the project's allreduce_ and of raw mpi4py."""
        from ..comm.mpi import raw_allreduce
        comm = self.comm
        # Zeros stay zeros: repeated in-place sums never overflow or turn denormal.
        buf = np.zeros(n, dtype=np.float32)

        def project() -> None:
            for _ in range(inner):
                comm.allreduce_(buf)

        def mpi4py_raw() -> None:
            for _ in range(inner):
                raw_allreduce(comm, buf)

        for f in (project, mpi4py_raw, project, mpi4py_raw):
            f()
        times: dict[str, list[float]] = {"project": [], "raw": []}
        for i in range(repeats):
            pair = ((project, "project"), (mpi4py_raw, "raw"))
            for f, key in pair if i % 2 == 0 else pair[::-1]:
                comm.barrier()
                t0 = time.perf_counter()
                f()
                times[key].append((time.perf_counter() - t0) / inner)
        out = {k: float(np.median(v)) for k, v in times.items()}
        # Paired: each repeat's two batches ran back to back, so their ratio cancels the
        # drift of a shared machine that a ratio of two medians would keep.
        out["ratio"] = float(np.median(np.divide(times["project"], times["raw"])))
        return out

    def set_buffer(self, n: int) -> None:
        self.buf = np.zeros(n, dtype=np.float32)

    def grad(self) -> np.ndarray:
        return self.buf

    def set_grad(self, total: np.ndarray) -> None:
        np.copyto(self.buf, total)

    def close(self) -> None:
        self.comm.close()


def _ray_round(actors) -> float:
    """One object-store 'allreduce' driven from the driver; returns its wall time."""
    t0 = time.perf_counter()
    actors.object_store_sum("grad", "set_grad")
    return time.perf_counter() - t0


def run(quick: bool = False) -> list[dict]:
    from ..runtime.raysession import Actors, local_ray

    rows: list[dict] = []
    with local_ray(num_cpus=2):
        actors = Actors(AllreduceBenchWorker, 2, num_cpus=1)
        try:
            ports = actors.call("open_ports", each=[(r, 2) for r in range(2)], timeout=60)
            actors.call("join", each=[(ports, r, 2, RENDEZVOUS_TIMEOUT) for r in range(2)],
                        timeout=RENDEZVOUS_TIMEOUT + 30)
            mpi_repeats = 11 if quick else 101
            ray_repeats = 5 if quick else 15
            for n in SIZES:
                inner = int(min(1000, max(1, 200_000 // n)))
                mpi = actors.call("time_mpi", n, mpi_repeats, inner)[0]
                actors.call("set_buffer", n, timeout=60)
                _ray_round(actors)  # warm-up
                ray_s = float(np.median([_ray_round(actors) for _ in range(ray_repeats)]))
                rows.append({
                    "floats": n,
                    "MB": n * 4 / 1e6,
                    "project_us": mpi["project"] * 1e6,
                    "raw_mpi4py_us": mpi["raw"] * 1e6,
                    "project/raw": mpi["ratio"],
                    "ray_object_store_us": ray_s * 1e6,
                    "ray/project": ray_s / mpi["project"],
                })
            actors.call("close", timeout=60)
        finally:
            actors.close()
    return rows
