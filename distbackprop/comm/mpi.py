"""`MpiComm` and the rendezvous that forms it among Ray actors (the only mpi4py importer).

Importing this module initialises MPI (MPICH singleton init when not under mpiexec, with
MPI_THREAD_MULTIPLE: the rendezvous runs its blocking steps in a helper thread). Import it
only in processes that take part in a group: the workers, or every rank under mpiexec.
Before that, the import applies `distbackprop.comm.transport.transport_env()` (e.g.
``UCX_TLS=tcp,self`` in a container that shares the host's IPC namespace but not its PID
namespace, where UCX's shared memory cannot reach the host's processes).

Rendezvous among already-running processes (Ray actors), rank = actor index, in two
phases that every rank runs concurrently:

    ports_i = open_ports(rank, size)              # every rank; strings gathered through Ray
    comm = join([ports_0, ..., ports_{size-1}], rank, size, timeout=60.0)

The group is formed by recursive doubling, in ⌈log₂ size⌉ rounds (the schedule lives in
`distbackprop.comm.rendezvous`): in round r the group of ranks [a, a+2^r), a a multiple of
2^(r+1), merges with the group [a+2^r, min(a+2^(r+1), size)) if that one is non-empty.
The lower group calls `Accept(port, info, root=0)` collectively on its intracommunicator,
the upper group `Connect(port, info, root=0)` on its own, and the intercommunicator is
merged with the upper group on top, so ranks stay equal to actor indices whatever order
the actors arrive in. An MPI port must be accepted by the process that opened it, so each
lower group's leader (rank a) opens its own ports in `open_ports`, one per round it leads
(rank 0 one per round, odd ranks none), and closes them when its `join` ends, on success
or failure; `close_ports` is for a rendezvous abandoned before that rank joined. The old
schedule, one newcomer at a time (size−1 rounds, every port opened by rank 0), stays
available as ``schedule="sequential"`` for `distbackprop bench rendezvous`.

MPICH 4.x bounds Accept and Connect by the info key "timeout" (seconds; every round gets
what is left of the caller's `timeout`), so a rank that never arrives turns into an MPI
error on every waiting rank, reported as `RendezvousError`. A missing rank is a group of
one in its first merge (a group it would have merged with earlier would contain it), so
the other side of that merge names it exactly ("rank 5 did not join ..."); ranks that
waited for a larger group name that group ("ranks 4..7 did not join ...": the errors
raised among those ranks name the missing one). The process stays usable. A
Connect or Accept that fails long before its timeout gets the transport hint (`FIX_HINT`).
Steps MPI cannot bound (a peer dying between Connect and Merge) are covered by running
the rendezvous in a thread that the caller waits for with a deadline; if that deadline
passes, the process's MPI state is unusable and the caller must stop the process (the
coordinator kills the group and starts a new one). The formed group is verified by an
allreduce of the ranks.
"""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np

from distbackprop.comm.base import RendezvousError, Request
from distbackprop.comm.rendezvous import Merge, plan, ports_led, span
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

__all__ = ["MPI", "MpiComm", "MpiRequest", "TRANSPORT_ENV", "open_ports", "close_ports",
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


def open_ports(rank: int, size: int, schedule: str = "doubling") -> str:
    """Open the ports `rank` will accept on in a rendezvous of `size` ranks.

    Every rank calls it (concurrently) before `join`: one MPI port per merge this rank
    leads under `schedule` (doubling: one per round in which it is the lower group's
    leader; sequential: rank 0 opens size−1 ports, the others none), newline-separated,
    "" if none. The coordinator passes every rank's string to every rank's `join`, whose
    end (success or failure) closes this rank's ports; `close_ports` is for a rendezvous
    abandoned before this rank joined.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for size {size}")
    return "\n".join(MPI.Open_port() for _ in range(ports_led(rank, size, schedule)))


def _ports(ports: str) -> list[str]:
    return ports.split("\n") if ports else []


def close_ports(ports: str) -> None:
    """Close every MPI port in `ports` (this process's `open_ports` string)."""
    for name in _ports(ports):
        MPI.Close_port(name)


def _mpi_reason(exc: MPI.Exception) -> str:
    # MPICH appends its whole call stack; the first clause names the error class.
    return exc.Get_error_string().splitlines()[0].split(", error stack")[0].rstrip(":, ")


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


def _absent(m: Merge, rank: int, timeout: float, why: str = "",
            hint: str = "") -> RendezvousError:
    """The error of a merge whose other side did not come: a side of one rank is named
    as the missing rank; a larger side is named as a group (its own ranks' errors name
    the missing one)."""
    if rank < m.mid:  # the lower group waited in Accept for [mid, hi)
        waiting = f"{span(m.lo, m.mid)} {'was' if m.mid - m.lo == 1 else 'were'} waiting"
        if m.hi - m.mid == 1:
            return RendezvousError(
                f"rank {m.mid} did not join the MPI group within {timeout:g} s ({waiting}; "
                f"raised on rank {rank}{why}){hint}", rank=rank, missing_rank=m.mid)
        return RendezvousError(
            f"{span(m.mid, m.hi)} did not join the MPI group within {timeout:g} s (they had "
            f"not all joined: the errors raised among them name the missing rank; {waiting}; "
            f"raised on rank {rank}{why}){hint}", rank=rank)
    what = (f"{span(m.lo, m.mid)} did not accept {span(m.mid, m.hi)} into the MPI group "
            f"within {timeout:g} s")
    if m.mid - m.lo == 1:
        return RendezvousError(f"{what} (raised on rank {rank}{why}){hint}",
                               rank=rank, missing_rank=m.lo)
    return RendezvousError(
        f"{what} (they had not all joined: the errors raised among them name the missing "
        f"rank; raised on rank {rank}{why}){hint}", rank=rank)


def _other_side(m: Merge, rank: int) -> tuple[int, int]:
    """The ranks [lo, hi) that `rank` waits for in merge `m`."""
    return (m.mid, m.hi) if rank < m.mid else (m.lo, m.mid)


def _link(group: MPI.Intracomm, port: str, m: Merge, rank: int, timeout: float,
          deadline: float) -> MPI.Intercomm:
    """One merge's intercommunicator: the lower group Accepts (collective, root 0 = its
    leader, who opened `port`), the upper group Connects (collective, root 0)."""
    if time.monotonic() >= deadline:
        raise _absent(m, rank, timeout)
    info = _info_timeout(deadline)
    try:
        if rank < m.mid:
            return group.Accept(port, info, 0)
        return group.Connect(port, info, 0)
    except MPI.Exception as exc:
        raise _absent(m, rank, timeout, f"; MPI: {_mpi_reason(exc)}",
                      _transport_hint(deadline)) from exc
    finally:
        info.Free()


def _form(ports: list[list[str]], rank: int, size: int, steps: list[Merge], timeout: float,
          deadline: float, progress: dict) -> MPI.Intracomm:
    """Carry out this rank's merges from COMM_SELF; the merged Intracomm has rank `rank`."""
    group = MPI.COMM_SELF
    try:
        for m in steps:
            progress["waiting"] = _other_side(m, rank)
            inter = _link(group, ports[m.lo][m.port], m, rank, timeout, deadline)
            try:
                merged = inter.Merge(rank >= m.mid)  # upper group on top: rank = index
            finally:
                inter.Free()
            if group != MPI.COMM_SELF:
                group.Free()
            group = merged
        progress["waiting"] = None
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


def _port_lists(ports: list[str], size: int, schedule: str) -> list[list[str]]:
    """Every rank's port names, checked against what `schedule` has each rank open."""
    if len(ports) != size:
        raise ValueError(f"{len(ports)} port strings for a group of size {size}: pass every "
                         f"rank's open_ports result, in rank order")
    lists = [_ports(p) for p in ports]
    for i, names in enumerate(lists):
        need = ports_led(i, size, schedule)
        if len(names) != need:
            raise ValueError(f"rank {i}'s port string holds {len(names)} ports; the {schedule} "
                             f"rendezvous of size {size} needs {need} (open_ports({i}, {size}, "
                             f"{schedule!r}))")
    return lists


def join(ports: list[str], rank: int, size: int, timeout: float = 60.0,
         schedule: str = "doubling") -> MpiComm:
    """Form the MPI group of `size` ranks (every rank calls this concurrently).

    `ports[i]` is rank i's `open_ports(i, size, schedule)` string, the same list on every
    rank. Merges groups as `schedule` says (see the module docstring; ⌈log₂ size⌉ rounds
    for "doubling"). Returns an `MpiComm` whose rank is `rank`, verified by an allreduce
    of the ranks. Closes this rank's own ports when it ends. Raises `RendezvousError`
    within about `timeout` seconds (never hangs), naming the rank that did not join or,
    on ranks that waited for a whole group, that group. After an error the process stays
    usable unless the message says MPI itself is stuck. Inconsistent arguments raise
    `ValueError` before anything else (the ports then stay open: `close_ports`).
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for size {size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    port_lists = _port_lists(ports, size, schedule)
    steps = plan(rank, size, schedule)
    if size == 1:
        return MpiComm(MPI.COMM_SELF.Dup())

    deadline = time.monotonic() + timeout
    progress: dict = {"waiting": _other_side(steps[0], rank)}
    outcome: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["comm"] = _form(port_lists, rank, size, steps, timeout, deadline, progress)
        except MPI.Exception as exc:  # e.g. a Merge with a peer that went away
            w = progress["waiting"]
            outcome["error"] = RendezvousError(
                f"MPI rendezvous failed on rank {rank} "
                f"({'verifying the group' if w is None else f'merging with {span(*w)}'}): "
                f"{_mpi_reason(exc)}", rank=rank)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            close_ports(ports[rank])
            done.set()

    thread = threading.Thread(target=run, name=f"mpi-rendezvous-rank{rank}", daemon=True)
    thread.start()
    if not done.wait(timeout + _THREAD_GRACE_SECONDS):
        w = progress["waiting"]
        raise RendezvousError(
            f"MPI rendezvous on rank {rank} still blocked "
            f"{timeout + _THREAD_GRACE_SECONDS:g} s after start "
            f"({'verifying the group' if w is None else f'waiting for {span(*w)}'}); this "
            f"process's MPI state is unusable: stop the process",
            rank=rank, missing_rank=w[0] if w is not None and w[1] - w[0] == 1 else None)
    if "error" in outcome:
        raise outcome["error"]
    return MpiComm(outcome["comm"])


def raw_allreduce(comm: MpiComm, buf: np.ndarray) -> None:
    """Plain mpi4py in-place SUM Allreduce on `comm` (the benchmark's reference)."""
    comm.mpi_comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def _mpi_type(a: np.ndarray) -> MPI.Datatype:
    return MPI._typedict[a.dtype.char]
