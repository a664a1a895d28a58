"""Worker groups: the same protocol in one process (`LocalGroup`) and over Ray actors (`RayGroup`).

A group runs a chunk of steps on every replica and returns the per-rank
results. Failures surface as `WorkerFailure` naming the rank(s): an actor's
death (`ActorDiedError`) or a watchdog deadline with no chunk back. MPI never
reports a dead peer (survivors stay blocked inside the collective), so the
only remedy is to kill the whole group and start a new one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..metrics.health import pack_rows, unpack_rows
from ..threads import blas_env
from .faults import worker_class
from .heap import release, settle
from .worker import ReplicaSpec, Worker

# Calls a worker actor takes at once: the running chunk, the one queued behind it, and
# room for a stop request, a probe (`pid`) and a call that arrives while a chunk is
# abandoned.
_ACTOR_THREADS = 4

# How long a recovery waits for the GCS to declare an unreachable node dead (Ray's default
# health checks take ~14 s here; see deploy/README.md for tightening them).
NODE_VERDICT_SECONDS = 60.0


class WorkerFailure(RuntimeError):
    """A replica died or hung; `ranks` names them; `reason` is the restart metric's label
    (death, hang, node_lost, resize). `noticed_at` (time.time()) is the first sign of it
    (Ray's error, or the deadline passing); `verdict_seconds` how long the group then
    waited for the GCS to declare a vanished node dead (0 when it did not wait)."""

    def __init__(self, message: str, ranks: list[int], reason: str = "death", *,
                 noticed_at: float | None = None, verdict_seconds: float = 0.0):
        super().__init__(message)
        self.ranks = ranks
        self.reason = reason
        self.noticed_at = time.time() if noticed_at is None else noticed_at
        self.verdict_seconds = verdict_seconds


class ChunkAbandoned(RuntimeError):
    """A stop was requested and the running chunk did not end within the grace period."""


@dataclass(frozen=True)
class GroupSpec:
    """What every replica needs (small: arrays travel as a cache path, not by value)."""

    replica: ReplicaSpec
    cache_path: str | None = None
    faults_json: str | None = None  # test-only fault injection, passed to every replica

    def build_worker(self, rank: int, world: int, x=None, y=None, comm=None) -> Worker:
        cls, extra = worker_class(self.faults_json)
        return cls(self.replica, rank, world, x, y, comm=comm, **extra)


class WorkerGroup(Protocol):
    size: int
    # True: a submitted chunk runs while the coordinator handles the previous one's
    # results (the workers run chunks in submission order), so a second may be queued.
    pipelines: bool

    def start(self) -> None: ...
    def submit_chunk(self, start: int, k: int, consecutive_skips: int | None,
                     want_state: bool = True) -> Any:
        """Start steps [start, start+k) (None: each worker goes on from its own skip count);
        returns a handle for `collect_chunk`."""
        ...
    def collect_chunk(self, pending: Any, deadline: float) -> tuple[list[dict], Any]:
        """Per-rank results of a submitted chunk, and — if it was submitted `want_state` —
        the state after it (a dict of arrays or a handle `Commit.resolved` can fetch),
        else None. Waits at most `deadline` seconds."""
        ...
    def grad_step(self, step: int, params: np.ndarray | None,
                  deadline: float) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, np.ndarray]) -> None: ...
    def shutdown(self, graceful: bool = False) -> None: ...


class RunsOnCollect:
    """`submit_chunk`/`collect_chunk` for a group that computes in the caller's process:
    the chunk runs (`run_chunk`) when it is collected, so nothing is ever in flight."""

    pipelines = False

    def submit_chunk(self, start: int, k: int, consecutive_skips: int | None,
                     want_state: bool = True) -> tuple:
        return start, k, consecutive_skips, want_state

    def collect_chunk(self, pending: tuple, deadline: float) -> tuple[list[dict], Any]:
        start, k, consecutive_skips, want_state = pending
        return self.run_chunk(start, k, consecutive_skips, deadline, want_state)


class LocalGroup(RunsOnCollect):
    """One in-process replica on `LocalComm`: `--local` mode, no Ray, no MPI."""

    size = 1
    interrupt = None  # a chunk in this process cannot be abandoned; it ends within ~2 s

    def __init__(self, spec: GroupSpec, x: np.ndarray | None, y: np.ndarray | None):
        self.spec, self.x, self.y = spec, x, y
        self.worker: Worker | None = None

    def start(self) -> None:
        self.worker = self.spec.build_worker(0, 1, self.x, self.y)
        settle()  # no full collections of this process's heap while it trains (`heap`)

    def run_chunk(self, start: int, k: int, consecutive_skips: int | None, deadline: float,
                  want_state: bool = True) -> tuple[list[dict], Any]:
        res = self.worker.run_chunk(start, k, consecutive_skips)  # one replica: no checksum
        return [res], (self.worker.state() if want_state else None)

    def grad_step(self, step: int, params, deadline: float) -> dict[str, Any]:
        return self.worker.reduced_gradient(step, params)

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.worker.load_state_(state)

    def shutdown(self, graceful: bool = False) -> None:
        self.worker = None
        release()


def _transport_for(peers: list[dict]) -> None:
    """Before MPI starts in this actor: the transport its peers' namespaces allow."""
    from ..comm.transport import apply_transport_env, transport_env
    apply_transport_env(transport_env(peers))


def _limit_blas(cpus: int) -> None:
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=cpus)


class Turns:
    """One thread that runs an actor's calls in the order of their tickets.

    A worker actor takes several calls at once (`max_concurrency`), so the chunk the
    coordinator queued is already here when the running one ends. Each call hands its
    work to this thread and waits for it: the thread goes from one chunk straight into
    the next while Ray stores the finished chunk's results and replies on the caller's
    thread. (On a one-thread actor, or with the work on Ray's threads, Ray's reply and
    the hand-over to the next call idled the worker ~1–1.5 ms per chunk.) Ray does not
    promise the order in which a threaded actor starts calls, so each carries a ticket
    (0, 1, 2, … per actor, in submission order); MPI sees one caller, this thread.
    """

    def __init__(self) -> None:
        self._next = 0
        self._jobs: dict[int, tuple] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._loop, name="worker-turns", daemon=True).start()

    def run(self, ticket: int, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the turns thread once every earlier ticket has run; its result
        (or exception) here."""
        done = threading.Event()
        out: list = []
        with self._cond:
            self._jobs[ticket] = (fn, args, out, done)
            self._cond.notify_all()
        done.wait()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def _loop(self) -> None:
        job = self._take()
        while True:
            fn, args, out, done = job
            try:
                out.append(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                out.append(exc)
            # Take the next call (already queued, in a steady run) before waking this one's
            # caller: Ray's handling of the result then holds the GIL while the next chunk
            # is already inside its first BLAS call, instead of before it starts.
            with self._cond:
                queued = self._jobs.pop(self._next, None)
                if queued is not None:
                    self._next += 1
            done.set()
            job = queued if queued is not None else self._take()

    def _take(self) -> tuple:
        with self._cond:
            self._cond.wait_for(lambda: self._next in self._jobs)
            self._next += 1
            return self._jobs.pop(self._next - 1)


class _ActorBody:
    """The plain class a Ray actor wraps: builds a `Worker` from a `GroupSpec`.

    The underscored methods are called through `call` with a ticket and run in ticket
    order on one thread (`Turns`); `pid`, `sees_store` and `request_stop` answer at once
    on a spare thread, even while a chunk runs."""

    def __init__(self, spec: GroupSpec, rank: int, world: int):
        cfg = spec.replica.config
        _limit_blas(cfg.cpus_per_worker)
        from ..data import load_training_data, open_cache
        x = y = None
        if spec.replica.stream is not None:
            pass  # each rank streams its own row groups
        elif spec.cache_path and os.path.exists(spec.cache_path):
            x, y = open_cache(spec.cache_path)
        else:  # another node: read the source once more (deterministic)
            b = load_training_data(cfg)
            x, y = b.x_train, b.y_train
        self.worker = spec.build_worker(rank, world, x, y)
        self.rank, self.world = rank, world
        self._slots = None  # on the coordinator's machine: commits via /dev/shm
        self._split = False  # every rank writes its block of each commit (see _run_chunk)
        self._turns = Turns()
        settle()  # this process lives to train: no full collections of its heap (`heap`)

    def call(self, ticket: int, method: str, *args: Any) -> Any:
        """Run `method(*args)` when `ticket`'s turn comes (see `Turns`)."""
        return self._turns.run(ticket, getattr(self, "_" + method), *args)

    def request_stop(self) -> None:
        """A stop: the running chunk ends within a step, later ones run none (answered on
        a spare thread, not in turn; see `Worker.request_stop`)."""
        self.worker.request_stop()

    def sees_store(self, directory: str, token: str) -> bool:
        """Whether this process sees the coordinator's shared-memory commit store."""
        from .commitstore import sees
        return sees(directory, token)

    def _use_commit_store(self, directory: str, token: str, first_seq: int,
                          split: bool) -> bool:
        """Write commits into the coordinator's shared-memory store (`commitstore`): rank 0
        makes the slots; with `split` every rank of the group (all on this machine) maps
        them and writes its block of each commit. False: no room, or this process does not
        see the store; commits then go through Ray's object store."""
        from .commitstore import SlotWriter, sees
        if not sees(directory, token):
            return False
        slots = SlotWriter(directory, first_seq)
        try:
            if self.rank == 0:
                slots.prepare(self.worker.full_state_template())
            else:
                slots.attach(self.worker.full_state_template())
        except OSError:  # no room in /dev/shm (NoRoom)
            return False
        self._slots, self._split = slots, split
        return True

    def _commit_split(self, on: bool) -> None:
        """Turn split commits off (a rank could not map the slots): rank 0 gathers."""
        self._split = on
        if not on and self.rank != 0:
            self._slots = None

    def heap(self) -> dict[str, int]:
        """Objects the cyclic collector skips (frozen by `heap.settle`) and still tracks
        (answered at once; for diagnosis and tests)."""
        import gc
        return {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}

    def pid(self) -> ActorPid:
        """This process's PID with where it is valid: the Ray node and the namespaces."""
        import ray

        from ..comm.transport import process_identity
        return ActorPid(os.getpid(), ray.get_runtime_context().get_node_id(),
                        process_identity())

    def _open_ports(self, peers: list[dict]) -> str:
        """The MPI ports this rank accepts on in the rendezvous (MPI starts here)."""
        _transport_for(peers)
        from ..comm.mpi import open_ports
        return open_ports(self.rank, self.world)

    def _join(self, ports: list[str], timeout: float, peers: list[dict]) -> int:
        """Form the group (each rank's join closes its own ports, on success or failure)."""
        _transport_for(peers)
        from ..comm.mpi import join
        comm = join(ports, self.rank, self.world, timeout)
        self.worker.set_comm(comm)
        return comm.size

    def _run_chunk(self, start: int, k: int, consecutive_skips: int | None,
                   want_state: bool) -> dict | tuple[dict, Any]:
        """The statistics; with `want_state`, (statistics, rank 0's state), called with
        num_returns=2: the state becomes its own object, owned by the coordinator — or,
        with a commit store, rank 0 writes it into a shared-memory slot and returns the
        slot's `SharedState` descriptor. A chunk that ships the state also carries the
        parameter checksum (see `check_replicas`). (One return object per chunk that ships
        nothing: each costs Ray's bookkeeping on the coordinator too.)"""
        res = _packed(self.worker.run_chunk(start, k, consecutive_skips))
        if not want_state:
            return res
        res["checksum"] = self.worker.checksum()
        if self._split:  # every rank writes its block, in parallel; rank 0 seals the slot
            comm = self.worker.comm
            into = self._slots.begin(mark=self.rank == 0)
            comm.barrier()  # the slot reads as torn before anyone writes into it
            self.worker.write_state_block(into)
            comm.barrier()  # every block is in
            return res, (self._slots.finish() if self.rank == 0 else None)
        if self._slots is not None:  # rank 0 alone (optimizer blocks gathered into the slot)
            self.worker.commit_state(self._slots.begin())
            return res, self._slots.finish()
        state = self.worker.commit_state()  # collective when the update is sharded
        # The next call's turn starts when this returns, while Ray still serialises the
        # result on this thread: hand it arrays the next chunk does not write.
        return res, None if state is None else {k: v.copy() for k, v in state.items()}

    def _grad_step(self, step: int, params) -> dict:
        return self.worker.reduced_gradient(step, params)

    def _load_state(self, state: dict) -> None:
        self.worker.load_state_(state)

    def _close(self) -> None:
        self.worker.comm.close()


def _packed(result: dict[str, Any]) -> dict[str, Any]:
    """A chunk's result with its statistics as one bytes object (`pack_rows`)."""
    return {**result, "stats": pack_rows(result["stats"])}


class RayGroup:
    """N Ray actors in a placement group, joined by one MPI communicator."""

    pipelines = True

    def __init__(self, spec: GroupSpec, size: int, rendezvous_timeout: float = 60.0,
                 commit_store=None):
        """`commit_store`: the run's `commitstore.CommitStore`, used when rank 0 lands on
        this machine (None: commits always go through Ray's object store)."""
        self.spec = spec
        self.size = size
        self.rendezvous_timeout = rendezvous_timeout
        self.commit_store = commit_store
        self._shared_commits = False
        self.actors: list = []
        self._tickets: list[int] = []  # the next ticket of each actor (see `Turns`)
        self.pids: list[int] = []
        self.pg = None
        self.interrupt: Callable[[], bool] | None = None  # True: abandon the chunk in flight

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.spec.replica.config
        cpus = cfg.cpus_per_worker
        self.pg = placement_group([{"CPU": cpus}] * self.size,
                                  strategy="PACK" if cfg.placement == "pack" else "SPREAD")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.rendezvous_timeout)
        if not ready:
            self.shutdown()
            raise WorkerFailure(
                f"could not place {self.size} workers × {cpus} CPU within "
                f"{self.rendezvous_timeout:.0f} s (cluster resources: "
                f"{ray.cluster_resources().get('CPU', 0):.0f} CPU)", list(range(self.size)))
        env = blas_env(cpus)  # before NumPy loads in the actor
        actor_cls = ray.remote(_ActorBody)
        self.actors = [
            actor_cls.options(
                num_cpus=cpus, max_restarts=0, max_concurrency=_ACTOR_THREADS,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env},
            ).remote(self.spec, i, self.size)
            for i in range(self.size)
        ]
        self._tickets = [0] * self.size
        self.pids = self._gather([a.pid.remote() for a in self.actors],
                                 self.rendezvous_timeout, "start")
        if self.size > 1:
            peers = [p.identity for p in self.pids]  # decides the MPI transport (UCX_TLS)
            # Two phases, each on every actor at once: open the ports each rank leads,
            # then join with all of them (recursive doubling, ⌈log₂ N⌉ rounds).
            ports = self._gather(self._call_all("open_ports", peers),
                                 self.rendezvous_timeout, "open their MPI ports")
            sizes = self._gather(self._call_all("join", ports, self.rendezvous_timeout,
                                                 peers),
                                 self.rendezvous_timeout + 5, "join the MPI communicator")
            if any(s != self.size for s in sizes):
                raise WorkerFailure(f"communicator formed with sizes {sizes}, expected "
                                    f"{self.size}", list(range(self.size)))
        self._attach_commit_store()

    def _attach_commit_store(self) -> None:
        """Rank 0 on this machine writes commits into the shared-memory store; when every
        rank is here, each writes its block of every commit (split commits)."""
        store = self.commit_store
        local = _local_ranks(self.pids)
        if store is None or 0 not in local:
            return
        where = (str(store.path), store.token)
        args = (*where, store.first_seq())
        split = len(local) == self.size > 1 and all(self._gather(
            [a.sees_store.remote(*where) for a in self.actors], self.rendezvous_timeout,
            "look for the commit store"))
        what = "open the commit store"
        self._shared_commits = self._gather([self._call(0, "use_commit_store", *args, split)],
                                            self.rendezvous_timeout, what)[0]
        if not (self._shared_commits and split):
            return
        if not all(self._gather([self._call(i, "use_commit_store", *args, True)
                                 for i in range(1, self.size)], self.rendezvous_timeout, what)):
            self._gather(self._call_all("commit_split", False), self.rendezvous_timeout, what)

    def _call(self, rank: int, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Queue `method(*args)` on actor `rank` with its next ticket (see `Turns`)."""
        ticket, self._tickets[rank] = self._tickets[rank], self._tickets[rank] + 1
        return self.actors[rank].call.options(num_returns=num_returns).remote(
            ticket, method, *args)

    def _call_all(self, method: str, *args: Any, num_returns: int = 1) -> list:
        return [self._call(i, method, *args, num_returns=num_returns)
                for i in range(len(self.actors))]

    def _gather(self, refs: list, deadline: float, what: str) -> list:
        """ray.get with a deadline; the first actor death or the deadline → WorkerFailure."""
        import ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        index = {r: i for i, r in enumerate(refs)}
        pending = list(refs)
        results: dict[int, Any] = {}
        end = time.monotonic() + deadline
        while pending:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=min(0.5, max(0.0, end - time.monotonic())))
            if not ready and self.interrupt is not None and self.interrupt():
                raise ChunkAbandoned(f"stopped while waiting for the workers to {what}")
            if not ready and time.monotonic() < end:
                continue
            if not ready:
                missing = sorted(index[r] for r in pending)
                raise WorkerFailure(
                    f"worker rank(s) {', '.join(map(str, missing))} did not {what} within "
                    f"{deadline:.1f} s (hung, or blocked on a peer that hung)", missing, "hang")
            r = ready[0]
            try:
                results[index[r]] = ray.get(r)
            except RayActorError as exc:
                noticed = time.time()
                reason = self._failure_reason(exc, index[r])  # may wait for the GCS verdict
                raise WorkerFailure(f"worker rank {index[r]} died while trying to {what}: "
                                    f"{type(exc).__name__}", [index[r]], reason,
                                    noticed_at=noticed,
                                    verdict_seconds=time.time() - noticed) from None
            except RayTaskError as exc:
                raise WorkerFailure(f"worker rank {index[r]} failed to {what}: "
                                    f"{exc.cause!r}", [index[r]]) from None
            except RayError as exc:  # e.g. an argument (a commit) lost with its node
                raise WorkerFailure(f"worker rank {index[r]} could not {what}: "
                                    f"{type(exc).__name__}", [index[r]]) from None
        return [results[i] for i in sorted(results)]

    def _failure_reason(self, exc: Exception, rank: int) -> str:
        """"node_lost" when the actor's node is unreachable or gone, else "death".

        Ray reports an unreachable actor (`ActorUnavailableError`) within moments of its
        node vanishing, while the node itself is declared dead only after its health
        checks time out (~14 s here)."""
        import ray
        from ray.exceptions import ActorUnavailableError
        node = getattr(self.pids[rank], "node_id", None) if rank < len(self.pids) else None

        def alive() -> bool:
            return node is not None and {n["NodeID"]: n["Alive"] for n in ray.nodes()}.get(
                node, False)

        if not isinstance(exc, ActorUnavailableError):
            return "node_lost" if node is not None and not alive() else "death"
        # Until the GCS declares the node dead, Ray still counts its CPUs as free and would
        # place the next group there: wait for the verdict (bounded) before re-forming.
        end = time.monotonic() + NODE_VERDICT_SECONDS
        while alive() and time.monotonic() < end:
            time.sleep(0.5)
        return "node_lost"

    @property
    def commit_is_local(self) -> bool:
        """Rank 0, whose result holds each commit, runs on the coordinator's own node and
        commits through Ray's object store there (safe as soon as it is returned). A
        commit in the shared-memory store is not: its slot is reused two commits later,
        so the coordinator copies it out first."""
        import ray
        if self._shared_commits:
            return False
        node = getattr(self.pids[0], "node_id", None) if self.pids else None
        return node is not None and node == ray.get_runtime_context().get_node_id()

    def submit_chunk(self, start: int, k: int, consecutive_skips: int | None,
                     want_state: bool = True) -> tuple:
        """Queue the chunk on every actor (each runs its calls in order) and return."""
        refs = self._call_all("run_chunk", start, k, consecutive_skips, want_state,
                              num_returns=2 if want_state else 1)
        pairs = [tuple(r) if want_state else (r, None) for r in refs]
        return start, k, pairs, want_state

    def request_stop(self) -> None:
        """A stop: the running chunk ends within a step (on every rank at the same one),
        and the chunks queued behind it run none."""
        for actor in self.actors:
            actor.request_stop.remote()

    def collect_chunk(self, pending: tuple, deadline: float) -> tuple[list[dict], Any]:
        start, k, pairs, want_state = pending
        results = self._gather([p[0] for p in pairs], deadline,
                               f"finish steps {start}..{start + k - 1}")
        for r in results:
            r["stats"] = unpack_rows(r["stats"])
        return results, (pairs[0][1] if want_state else None)

    def grad_step(self, step: int, params, deadline: float) -> dict[str, Any]:
        import ray
        ref = ray.put(params) if params is not None else None
        res = self._gather(self._call_all("grad_step", step, ref), deadline,
                           f"finish step {step}")
        out = res[0]
        out["memory_all"] = {r["rank"]: r["memory"] for r in res}
        return out

    def load_state(self, state) -> None:
        """`state`: a dict of arrays, or an object-store reference to one (a commit from
        the shared-memory store has been copied out before it is safe to restore)."""
        import ray
        ref = ray.put(state) if isinstance(state, dict) else state
        self._gather(self._call_all("load_state", ref), 120, "load state")

    def shutdown(self, graceful: bool = False) -> None:
        """Kill every actor, wait until each is gone, and remove the placement group.

        Only an actor on the driver's own node (and PID namespace) is waited for, and if
        need be SIGKILLed, by its PID; any other actor's PID belongs to another machine or
        container, where the same number can be an unrelated local process, so those are
        left to Ray (`ray.kill`, then wait until Ray reports them dead).
        """
        import ray
        if graceful and self.actors:
            try:
                self._gather(self._call_all("close"), 10, "close")
            except WorkerFailure:
                pass
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        local = _local_ranks(self.pids)
        remote = [a for i, a in enumerate(self.actors) if i not in local]
        end = time.monotonic() + 15.0
        _wait_pids_gone([self.pids[i] for i in sorted(local)], 15.0)
        _wait_actors_dead(remote, max(1.0, end - time.monotonic()))
        self.actors, self.pids, self._tickets = [], [], []
        if self.pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None


class ActorPid(int):
    """An actor's PID, as seen in its own PID namespace, with where that is: `node_id`
    (Ray's hex node id) and `identity` (`comm.transport.process_identity()`). Still an int,
    so code that lists, formats or compares worker PIDs is unchanged (str() and repr() are
    the int's: psutil builds /proc paths with them); `shutdown` signals it only where it is
    local (`_local_ranks`)."""

    node_id: str | None
    identity: dict

    def __new__(cls, pid: int, node_id: str | None = None,
                identity: dict | None = None) -> ActorPid:
        self = super().__new__(cls, pid)
        self.node_id = node_id
        self.identity = dict(identity or {})
        return self

    def __reduce__(self):
        return (ActorPid, (int(self), self.node_id, self.identity))


def _local_ranks(pids: list) -> set[int]:
    """Indices of the PIDs that name processes of this machine and PID namespace: same Ray
    node as the driver, same boot and PID namespace. A bare int (no location) never is."""
    if not pids:
        return set()
    import ray

    from ..comm.transport import process_identity
    here_node = ray.get_runtime_context().get_node_id()
    here = process_identity()
    return {i for i, p in enumerate(pids)
            if isinstance(p, ActorPid) and p.node_id == here_node
            and p.identity.get("boot_id") == here["boot_id"]
            and p.identity.get("pid_ns") == here["pid_ns"]}


def _wait_actors_dead(actors: list, timeout: float) -> list:
    """Wait until Ray reports each (killed) actor dead; returns those it did not in time.

    A call on a dead actor fails with RayActorError; one that returns means the actor was
    still alive, so it is asked again (a spare thread of the actor answers even behind a
    hung chunk) until the kill lands.
    """
    import ray
    from ray.exceptions import RayError

    end = time.monotonic() + timeout
    probes = {a.pid.remote(): a for a in actors}
    while probes and time.monotonic() < end:
        ready, _ = ray.wait(list(probes), num_returns=len(probes),
                            timeout=max(0.0, min(1.0, end - time.monotonic())))
        again = []
        for ref in ready:
            actor = probes.pop(ref)
            try:
                ray.get(ref, timeout=0)
                again.append(actor)  # answered: not dead yet
            except RayError:  # RayActorError: dead (or its node is gone with it)
                pass
        if again:
            time.sleep(0.1)
            probes.update({a.pid.remote(): a for a in again})
    return list(probes.values())


def _wait_pids_gone(pids: list[int], timeout: float) -> None:
    """Wait for local processes `pids` to exit; SIGKILL those still there at `timeout`.

    Only for PIDs of this machine and PID namespace (`_local_ranks`): a PID from another
    node names an unrelated process here, if any.
    """
    import psutil
    end = time.monotonic() + timeout
    for pid in pids:
        try:
            p = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except psutil.TimeoutExpired:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        except psutil.NoSuchProcess:
            pass
