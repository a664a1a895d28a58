"""The one communicator test body, run unchanged on every backend.

`run_comm_body(comm)` is called on every rank of a group (or on the single `LocalComm`)
and raises AssertionError on the first wrong result. Data are small integers stored as
floats, so every sum is exact whatever order MPI adds in, and results are compared with
`array_equal`, not a tolerance. Each rank regenerates every other rank's data from its
seed to compute the expected reduction locally.
"""

from __future__ import annotations

import numpy as np

from distbackprop.comm import BucketedAllreduce, Communicator, checksum, flag_max

SIZES = (0, 1, 7, 1000, 1_000_000)
DTYPES = (np.float32, np.float64)


def rank_data(rank: int, n: int, dtype, salt: int = 0) -> np.ndarray:
    """Rank `rank`'s buffer: n integers in [-1000, 1000] as `dtype` (sums stay exact)."""
    rng = np.random.default_rng([rank, n, salt])
    return rng.integers(-1000, 1001, size=n).astype(dtype)


def expected(size: int, n: int, dtype, op: str, salt: int = 0) -> np.ndarray:
    stack = np.stack([rank_data(r, n, dtype, salt) for r in range(size)])
    if op == "sum":
        return stack.sum(axis=0, dtype=np.float64).astype(dtype)
    return (stack.max if op == "max" else stack.min)(axis=0)


def check_allreduce(comm: Communicator) -> int:
    checked = 0
    for dtype in DTYPES:
        for n in SIZES:
            for op in ("sum", "max", "min"):
                buf = rank_data(comm.rank, n, dtype)
                out = comm.allreduce_(buf, op=op)
                assert out is buf, "allreduce_ must return the buffer it reduced in place"
                assert buf.dtype == dtype and buf.shape == (n,)
                want = expected(comm.size, n, dtype, op)
                assert np.array_equal(buf, want), f"allreduce_ {op} {dtype.__name__} n={n}"
                checked += 1
    # A view into a larger array is reduced in place, its surroundings untouched.
    base = np.full(30, -7.0)
    view = base[10:20]
    view[:] = comm.rank + 1
    comm.allreduce_(view)
    assert np.all(view == comm.size * (comm.size + 1) / 2)
    assert np.all(base[:10] == -7.0) and np.all(base[20:] == -7.0)
    return checked


def check_iallreduce(comm: Communicator) -> None:
    # Two in flight at once, then waited in the opposite order.
    a = rank_data(comm.rank, 1000, np.float64, salt=1)
    b = rank_data(comm.rank, 100_000, np.float32, salt=2)
    ra = comm.iallreduce_(a)
    rb = comm.iallreduce_(b, op="max")
    rb.wait()
    ra.wait()
    assert np.array_equal(a, expected(comm.size, 1000, np.float64, "sum", salt=1))
    assert np.array_equal(b, expected(comm.size, 100_000, np.float32, "max", salt=2))
    c = rank_data(comm.rank, 64, np.float64, salt=3)
    rc = comm.iallreduce_(c, op="min")
    while not rc.test():
        pass
    assert np.array_equal(c, expected(comm.size, 64, np.float64, "min", salt=3))


def check_bcast(comm: Communicator) -> None:
    for root in sorted({0, comm.size - 1}):
        for n in (0, 5, 1_000_000):
            buf = rank_data(comm.rank, n, np.float64, salt=4)
            out = comm.bcast_(buf, root=root)
            assert out is buf
            assert np.array_equal(buf, rank_data(root, n, np.float64, salt=4)), (root, n)


def check_bucketed(comm: Communicator) -> int:
    """Overlapped bucket reduction gives exactly the blocking result."""
    # Four "layers" laid out forward in one flat buffer; backward fills the last first.
    sizes = [3000, 20, 50_000, 7]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    layers = [(f"dense{i}", slice(int(bounds[i]), int(bounds[i + 1])))
              for i in range(len(sizes))]
    backward = layers[::-1]
    n_buckets = 0
    for dtype in DTYPES:
        for bucket_bytes in (1, 4096, 1 << 30):
            grads = np.zeros(int(bounds[-1]), dtype=dtype)
            reference = rank_data(comm.rank, grads.size, dtype, salt=5)
            blocking = comm.allreduce_(reference.copy())
            ddp = BucketedAllreduce(comm, grads, backward, bucket_bytes=bucket_bytes)
            assert sum(b - a for a, b in ddp.bucket_bounds) == grads.size
            n_buckets = max(n_buckets, ddp.n_buckets)
            for step in range(2):  # the helper rearms itself after wait_all
                grads[:] = reference
                # Odd ranks mark in a scrambled order: buckets must still start in one order.
                order = backward if comm.rank % 2 == 0 else [backward[i] for i in (2, 0, 3, 1)]
                for name, _ in order:
                    ddp.mark_ready_(name)
                out = ddp.wait_all()
                assert out is grads
                assert np.array_equal(grads, blocking), (dtype, bucket_bytes, step)
    assert n_buckets == 4, "bucket_bytes=1 must give one bucket per layer"
    return n_buckets


def check_flag_and_checksum(comm: Communicator) -> None:
    last = comm.size - 1
    assert flag_max(comm, 1.0 if comm.rank == last else 0.0) == 1.0
    assert flag_max(comm, float(comm.rank)) == float(last)
    assert flag_max(comm, 0.0) == 0.0

    params = rank_data(0, 10_001, np.float64, salt=6) / 3.0  # identical on every rank
    lo, hi = checksum(comm, params)
    assert lo == hi
    if comm.rank == last:
        params[1234] = np.nextafter(params[1234], np.inf)  # one ulp on one rank
    lo2, hi2 = checksum(comm, params)
    if comm.size > 1:
        assert lo2 != hi2, "a one-ulp difference on one rank must show in the checksum"
    else:
        assert lo2 == hi2


def check_errors(comm: Communicator) -> None:
    # Validated locally before any collective, so no rank is left waiting.
    for call in (lambda: comm.allreduce_(np.zeros(3), op="prod"),
                 lambda: comm.iallreduce_(np.zeros(3), op="avg"),
                 lambda: comm.bcast_(np.zeros(3), root=comm.size)):
        try:
            call()
        except ValueError:
            pass
        else:
            raise AssertionError("invalid op / root must raise ValueError")


def check_shared_mapping(comm: Communicator) -> bool:
    """`map_shared`: one machine's ranks see each other's stores, and no file is left in
    /dev/shm; a one-rank communicator gets no mapping. Returns whether one was made."""
    import os
    import struct

    from distbackprop.comm.shm import PREFIX, SHM_ROOT, map_shared
    mm = map_shared(comm, 4096)
    if comm.size == 1:
        assert mm is None
        return False
    assert mm is not None, "ranks of one machine must get a shared mapping"
    struct.pack_into("<q", mm, 8 * comm.rank, 1000 + comm.rank)
    comm.barrier()
    seen = [struct.unpack_from("<q", mm, 8 * r)[0] for r in range(comm.size)]
    assert seen == [1000 + r for r in range(comm.size)], seen
    left = [p for p in SHM_ROOT.glob(f"{PREFIX}*") if p.name.split("-")[2] == str(os.getpid())]
    assert not left, f"map_shared left {left} behind"
    comm.barrier()  # every rank has read before any unmaps
    mm.close()
    return True


def run_comm_body(comm: Communicator) -> dict:
    """Run every check on `comm`; returns a summary (rank, size, counts) on success."""
    assert 0 <= comm.rank < comm.size
    checked = check_allreduce(comm)
    check_iallreduce(comm)
    check_bcast(comm)
    n_buckets = check_bucketed(comm)
    check_flag_and_checksum(comm)
    check_errors(comm)
    shared = check_shared_mapping(comm)
    comm.barrier()
    return {"rank": comm.rank, "size": comm.size, "allreduce_cases": checked,
            "max_buckets": n_buckets, "shared": shared}
