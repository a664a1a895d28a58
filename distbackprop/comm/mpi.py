"""`MpiComm` and the rendezvous that forms it among Ray actors (the only mpi4py importer).

Importing this module initialises MPI (MPICH singleton init when not under mpiexec, with
MPI_THREAD_MULTIPLE: the rendezvous runs its blocking steps in a helper thread). Import it
only in processes that take part in a group: the workers, or every rank under mpiexec.
Before that, the import applies `distbackprop.comm.transport.transport_env()` (e.g.
``UCX_TLS=tcp,self`` in a container that shares the host's IPC namespace but not its PID
namespace, where UCX's shared memory cannot reach the host's processes).

Rendezvous among already-running processes (Ray actors), rank = actor index:

    # worker 0, then pass the string to every worker through Ray
    port = open_port(size)
    # every worker, concurrently (worker 0 included)
    comm = join(port, rank, size, timeout=60.0)

`open_port` opens one MPI port per newcomer (ranks 1..size-1), so newcomer k can only be
accepted as the k-th member and ranks come out in actor order whatever order the actors
reach `join`. The group grows one newcomer at a time: every current member calls
`Accept` (root 0) on port k-1 while rank k calls `Connect` from COMM_SELF; the resulting
intercommunicator is merged with the newcomer on top. MPICH 4.x bounds both calls by the
info key "timeout" (seconds), so a rank that never arrives turns into an MPI error on every
waiting rank, reported as `RendezvousError` naming the missing rank; rank 0 then closes the
ports and the process stays usable. Steps MPI cannot bound (a peer dying between Connect
and Merge) are covered by running the rendezvous in a thread that the caller waits for
with a deadline; if that deadline passes, the process's MPI state is unusable and the
caller must stop the process (the coordinator kills the group and starts a new one).
"""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np

from distbackprop.comm.base import RendezvousError, Request
from distbackprop.comm.transport import FIX_HINT, apply_transport_env, transport_env


def _choose_transport() -> dict[str, str]:
    """Apply `transport_env()` now: UCX reads its transport list once, at MPI_Init, which
    the mpi4py import below performs. Skipped if MPI was initialised elsewhere already."""
    env = transport_env()
    try:
        apply_transport_env(env)
    except RuntimeError:
        return {}
    return env


# What this process chose (e.g. {"UCX_TLS": "tcp,self"}), for diagnostics and tests.
TRANSPORT_ENV: dict[str, str] = _choose_transport()

from mpi4py import MPI  # noqa: E402 - must follow _choose_transport (see above)

__all__ = ["MPI", "MpiComm", "MpiRequest", "TRANSPORT_ENV", "open_port", "close_port",
           "join"]

_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
_IN_PLACE = MPI.IN_PLACE

# Extra wait, beyond the MPI-level timeouts, before the caller gives up on a rendezvous
# thread that MPI itself never returned from.
_THREAD_GRACE_SECONDS = 2.0


class MpiRequest:
    """A pending nonblocking collective; keeps its buffer alive until completion."""

    __slots__ = ("_req", "_buf")

    def __init__(self, req: MPI.Request, buf: np.ndarray) -> None:
        self._req = req
        self._buf = buf

    def wait(self) -> None:
        self._req.Wait()
        self._buf = None

    def test(self) -> bool:
        done = self._req.Test()
        if done:
            self._buf = None
        return done


class MpiComm:
    """A `Communicator` over an mpi4py Intracomm; buffer (uppercase) calls only, never pickle.

    Takes ownership of `comm`: `close()` disconnects it (collective over the group).
    """

    def __init__(self, comm: MPI.Intracomm) -> None:
        self._comm = comm
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()
        self._closed = False
        self._allreduce = comm.Allreduce

    @classmethod
    def world(cls) -> MpiComm:
        """The ranks started by `mpiexec -n N`: a duplicate of COMM_WORLD (so it can be closed)."""
        return cls(MPI.COMM_WORLD.Dup())

    @property
    def mpi_comm(self) -> MPI.Intracomm:
        """The wrapped mpi4py communicator (benchmarks compare against it directly)."""
        return self._comm

    @property
    def closed(self) -> bool:
        return self._closed

    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> np.ndarray:
        """In place (MPI.IN_PLACE): buf ← op over ranks of buf, elementwise. Returns `buf`."""
        mpi_op = _OPS.get(op)
        if mpi_op is None:
            raise ValueError(f"unsupported reduction op {op!r}; choose one of {', '.join(_OPS)}")
        # Bound method and module constant: this call sits on every training step, and at
        # 10 floats MPI itself takes ~1 µs, so each attribute lookup shows.
        self._allreduce(_IN_PLACE, buf, mpi_op)
        return buf

    def iallreduce_(self, buf: np.ndarray, op: str = "sum") -> Request:
        """Start an in-place Iallreduce of `buf`; do not touch `buf` before `wait()`."""
        mpi_op = _OPS.get(op)
        if mpi_op is None:
            raise ValueError(f"unsupported reduction op {op!r}; choose one of {', '.join(_OPS)}")
        return MpiRequest(self._comm.Iallreduce(_IN_PLACE, buf, mpi_op), buf)

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """In place: buf ← buf of rank `root`. Returns `buf`."""
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} out of range for a communicator of size {self.size}")
        self._comm.Bcast(buf, root)
        return buf

    def reduce_scatter_(self, send: np.ndarray, recv: np.ndarray,
                        counts: np.ndarray) -> np.ndarray:
        """recv ← this rank's block of SUM over ranks of `send` (`Reduce_scatter`)."""
        self._comm.Reduce_scatter(send, recv, counts, MPI.SUM)
        return recv

    def allgather_(self, buf: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """In place (`Allgatherv` with IN_PLACE): each rank's block of `buf` from its owner."""
        displs = np.concatenate(([0], np.cumsum(counts)[:-1]))
        self._comm.Allgatherv(_IN_PLACE, [buf, counts, displs, _mpi_type(buf)])
        return buf

    def gather_(self, send: np.ndarray, recv: np.ndarray | None, counts: np.ndarray,
                root: int = 0) -> np.ndarray | None:
        """`recv` on `root` ← every rank's `send` in rank order (`Gatherv`)."""
        displs = np.concatenate(([0], np.cumsum(counts)[:-1]))
        spec = [recv, counts, displs, _mpi_type(send)] if self.rank == root else None
        self._comm.Gatherv(send, spec, root)
        return recv

    def barrier(self) -> None:
        self._comm.Barrier()

    def close(self) -> None:
        """Disconnect (collective: every rank calls it, after its last collective).

        Never call it with a dead peer (it would wait for it); the coordinator kills the
        processes of a failed group instead.
        """
        if self._closed:
            return
        self._closed = True
        self._comm.Disconnect()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"MpiComm(rank={self.rank}, size={self.size}, {state})"


def open_port(size: int) -> str:
    """Open the ports of a rendezvous of `size` ranks; call it in the process of rank 0.

    Returns an opaque string (one MPI port name per newcomer, newline-separated) that the
    coordinator passes to every rank's `join`. Rank 0's `join` closes the ports, on success
    or failure; `close_port` is for a rendezvous abandoned before rank 0 joined.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return "\n".join(MPI.Open_port() for _ in range(size - 1))


def _ports(port: str) -> list[str]:
    return port.split("\n") if port else []


def close_port(port: str) -> None:
    """Close every MPI port in `port` (from `open_port`, in the same process)."""
    for name in _ports(port):
        MPI.Close_port(name)


def _mpi_reason(exc: MPI.Exception) -> str:
    # MPICH appends its whole call stack; the first clause names the error class.
    return exc.Get_error_string().splitlines()[0].split(", error stack")[0].rstrip(":, ")


def _members(k: int) -> str:
    return "rank 0 was" if k == 1 else f"ranks 0..{k - 1} were"


def _info_timeout(deadline: float) -> MPI.Info:
    info = MPI.Info.Create()
    # MPICH reads whole seconds; floor, so the error comes within the caller's timeout.
    info.Set("timeout", str(max(1, math.floor(deadline - time.monotonic()))))
    return info


def _transport_hint(deadline: float) -> str:
    """The fix to name when Connect/Accept failed long before its timeout: a peer that is
    merely late makes MPI wait, while a transport that cannot reach the peer fails at once."""
    if deadline - time.monotonic() < 2.0 or "tcp" in os.environ.get("UCX_TLS", ""):
        return ""
    return f"; failed at once, not by timeout: {FIX_HINT}"


def _grow(ports: list[str], rank: int, size: int, timeout: float, deadline: float,
          progress: dict) -> MPI.Intracomm:
    """Grow COMM_SELF into the whole group; returns the merged Intracomm with rank = `rank`."""
    group = MPI.COMM_SELF
    try:
        for k in range(max(rank, 1), size):
            progress["awaiting"] = k
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"rank {k} did not join the MPI group within {timeout:g} s "
                    f"(raised on rank {rank})", rank=rank, missing_rank=k)
            info = _info_timeout(deadline)
            try:
                if rank == k:
                    inter = MPI.COMM_SELF.Connect(ports[k - 1], info, 0)
                else:
                    inter = group.Accept(ports[k - 1], info, 0)
            except MPI.Exception as exc:
                hint = _transport_hint(deadline)
                if rank != k:
                    raise RendezvousError(
                        f"rank {k} did not join the MPI group within {timeout:g} s "
                        f"({_members(k)} waiting; raised on rank {rank}; MPI: "
                        f"{_mpi_reason(exc)}){hint}", rank=rank, missing_rank=k) from exc
                if k == 1:
                    raise RendezvousError(
                        f"rank 0 did not accept rank 1 into the MPI group within {timeout:g} s "
                        f"(raised on rank 1; MPI: {_mpi_reason(exc)}){hint}",
                        rank=rank, missing_rank=0) from exc
                raise RendezvousError(
                    f"rank {k} could not join the MPI group within {timeout:g} s: ranks "
                    f"0..{k - 1} had not all joined (rank 0 names the missing one; MPI: "
                    f"{_mpi_reason(exc)}){hint}", rank=rank, missing_rank=None) from exc
            finally:
                info.Free()
            try:
                merged = inter.Merge(rank == k)
            finally:
                inter.Free()
            if group != MPI.COMM_SELF:
                group.Free()
            group = merged
        progress["awaiting"] = None
        _verify(group, rank, size)
        return group
    except BaseException:
        if group != MPI.COMM_SELF:
            group.Free()
        raise


def _verify(group: MPI.Intracomm, rank: int, size: int) -> None:
    """Allreduce of [one-hot(rank), merged rank]: all ones, and ranks summing to n(n-1)/2."""
    buf = np.zeros(size + 1, dtype=np.int64)
    buf[rank] = 1
    buf[size] = group.Get_rank()
    group.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)
    if (group.Get_rank() != rank or group.Get_size() != size
            or not np.all(buf[:size] == 1) or buf[size] != size * (size - 1) // 2):
        raise RendezvousError(
            f"MPI group verification failed on rank {rank}: merged rank {group.Get_rank()} "
            f"of {group.Get_size()}, rank counts {buf[:size].tolist()}, rank sum {buf[size]}",
            rank=rank)


def join(port: str, rank: int, size: int, timeout: float = 60.0) -> MpiComm:
    """Form the MPI group of `size` ranks (every rank calls this concurrently).

    `port` is rank 0's `open_port(size)` string. Returns an `MpiComm` whose rank is
    `rank`, verified by an allreduce of the ranks. Raises `RendezvousError` naming the
    rank that did not join, within about `timeout` seconds (never hangs). After an error
    the process stays usable unless the message says MPI itself is stuck.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for size {size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    ports = _ports(port)
    if len(ports) != size - 1:
        raise ValueError(f"port string holds {len(ports)} ports; a group of size {size} "
                         f"needs {size - 1} (open_port(size) with the same size)")
    if size == 1:
        return MpiComm(MPI.COMM_SELF.Dup())

    deadline = time.monotonic() + timeout
    progress: dict = {"awaiting": max(rank, 1)}
    outcome: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["comm"] = _grow(ports, rank, size, timeout, deadline, progress)
        except MPI.Exception as exc:  # e.g. a Merge with a peer that went away
            k = progress["awaiting"]
            outcome["error"] = RendezvousError(
                f"MPI rendezvous failed on rank {rank} "
                f"({'verifying the group' if k is None else f'adding rank {k}'}): "
                f"{_mpi_reason(exc)}", rank=rank)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            if rank == 0:
                close_port(port)
            done.set()

    thread = threading.Thread(target=run, name=f"mpi-rendezvous-rank{rank}", daemon=True)
    thread.start()
    if not done.wait(timeout + _THREAD_GRACE_SECONDS):
        k = progress["awaiting"]
        who = f"waiting for rank {k}" if k is not None else "verifying the group"
        raise RendezvousError(
            f"MPI rendezvous on rank {rank} still blocked "
            f"{timeout + _THREAD_GRACE_SECONDS:g} s after start "
            f"({who}); this process's MPI state is unusable: stop the process",
            rank=rank, missing_rank=k if k != rank else None)
    if "error" in outcome:
        raise outcome["error"]
    return MpiComm(outcome["comm"])


def raw_allreduce(comm: MpiComm, buf: np.ndarray) -> None:
    """Plain mpi4py in-place SUM Allreduce on `comm` (the benchmark's reference)."""
    comm.mpi_comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def _mpi_type(a: np.ndarray) -> MPI.Datatype:
    return MPI._typedict[a.dtype.char]
