"""One communicator test body on three backends, and the rendezvous' failure modes.

LocalComm runs in this process. MpiComm runs over Ray actors (rendezvous by
Open_port/Accept/Connect, in ⌈log₂ N⌉ rounds or N−1) and under `mpiexec -n 2`. This process
never imports mpi4py.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tests.comm.body as body
from distbackprop.comm import (
    BucketedAllreduce,
    Communicator,
    LocalComm,
    RendezvousError,
    checksum,
    flag_max,
)
from tests.conftest import require_module, require_tool

REPO = Path(__file__).resolve().parents[2]
JOIN_TIMEOUT = 30.0
SHORT_TIMEOUT = 5.0


# ---------------------------------------------------------------- LocalComm ---------------

def test_body_on_local_comm():
    comm = LocalComm()
    assert isinstance(comm, Communicator)
    assert body.run_comm_body(comm) == {"rank": 0, "size": 1, "allreduce_cases": 30,
                                        "max_buckets": 4, "shared": False}


def test_stale_shared_files_are_removed_only_when_old_and_orphaned(tmp_path):
    """`map_shared`'s files are unlinked once mapped; one a SIGKILLed rank 0 left behind is
    removed by the next group on the machine — not a young one, nor a live creator's."""
    from distbackprop.comm.shm import PREFIX, STALE_SECONDS, map_shared, remove_stale
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)
    old = time.time() - 2 * STALE_SECONDS
    files = {name: tmp_path / f"{PREFIX}{name}-0123" for name in
             (f"{dead}", f"{dead}x", f"{os.getpid()}")}
    for p in files.values():
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    young = tmp_path / f"{PREFIX}{dead}-4567"
    young.write_bytes(b"x")
    remove_stale(tmp_path)
    assert not files[f"{dead}"].exists()
    assert files[f"{os.getpid()}"].exists() and young.exists()
    assert files[f"{dead}x"].exists()  # not a PID: not ours to judge
    assert map_shared(LocalComm(), 4096, tmp_path) is None  # one rank: nothing to share


def test_local_helpers_are_identity():
    comm = LocalComm()
    x = np.arange(5.0)
    assert comm.allreduce_(x, "max") is x and np.array_equal(x, np.arange(5.0))
    assert flag_max(comm, 3.0) == 3.0
    lo, hi = checksum(comm, x)
    assert lo == hi and all(v == float(int(v)) for v in lo)


@pytest.mark.parametrize("dtype,n", [(np.float64, 1001), (np.float32, 1001), (np.float32, 1)])
def test_every_single_bit_flip_changes_the_checksum(dtype, n):
    from distbackprop.comm import local_checksum
    x = np.random.default_rng(0).standard_normal(n).astype(dtype)
    base = local_checksum(x)
    raw = x.view(np.uint8)
    for byte in (0, raw.size // 2, raw.size - 1):  # the first, a middle and a tail byte
        for bit in range(8):
            raw[byte] ^= 1 << bit
            assert local_checksum(x) != base, (byte, bit)
            raw[byte] ^= 1 << bit
    assert local_checksum(x) == base
    # the same bit set in two words cancels in the XOR part but not in the sum
    if raw.size >= 16:
        raw[0] &= 0xFE
        raw[8] &= 0xFE
        base = local_checksum(x)
        raw[0] |= 1
        raw[8] |= 1
        assert local_checksum(x) != base


def test_bucketing_groups_adjacent_layers_and_rejects_gaps():
    grads = np.zeros(100)
    # forward layout: dense0 [0:10], dense1 [10:60], dense2 [60:100]; backward order given.
    layers = [("dense2", slice(60, 100)), ("dense1", slice(10, 60)), ("dense0", slice(0, 10))]
    ddp = BucketedAllreduce(LocalComm(), grads, layers, bucket_bytes=40 * 8)
    assert ddp.bucket_bounds == ((60, 100), (10, 60), (0, 10))
    # A bucket closes once it holds bucket_bytes: dense2 alone is short, dense2+dense1 not.
    two = BucketedAllreduce(LocalComm(), grads, layers, bucket_bytes=60 * 8)
    assert two.bucket_bounds == ((10, 100), (0, 10))
    assert np.shares_memory(ddp._views[0], grads)
    one = BucketedAllreduce(LocalComm(), grads, layers, bucket_bytes=1 << 30)
    assert one.bucket_bounds == ((0, 100),)
    with pytest.raises(ValueError, match="not adjacent"):
        BucketedAllreduce(LocalComm(), grads, [("a", slice(60, 100)), ("b", slice(0, 10))])
    with pytest.raises(KeyError, match="unknown layer"):
        one.mark_ready_("dense9")
    one.mark_ready_("dense0")
    with pytest.raises(ValueError, match="twice"):
        one.mark_ready_("dense0")
    one.wait_all()
    one.mark_ready_("dense0")  # rearmed after wait_all


def test_rendezvous_error_survives_pickling():
    err = RendezvousError("rank 1 did not join", rank=0, missing_rank=1)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.rank, back.missing_rank) == ("rank 1 did not join", 0, 1)


# ---------------------------------------------------------------- MpiComm over Ray ---------

def _comm_actor_class():
    ray = require_module("ray")
    # The actor and the body travel by value, so workers need not find `tests` on sys.path.
    ray.cloudpickle.register_pickle_by_value(body)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=1)
    class CommActor:
        """Test-only actor shell: forms the group through the public API, runs the body."""

        def __init__(self) -> None:
            self.comm = None

        def pid(self) -> int:
            return os.getpid()

        def open_ports(self, rank: int, size: int, schedule: str = "doubling") -> str:
            from distbackprop.comm.mpi import open_ports
            return open_ports(rank, size, schedule)

        def close_ports(self, ports: str) -> None:
            from distbackprop.comm.mpi import close_ports
            close_ports(ports)

        def join(self, ports: list[str], rank: int, size: int, timeout: float,
                 delay: float = 0.0, schedule: str = "doubling") -> dict:
            from distbackprop.comm.mpi import join
            time.sleep(delay)
            t0 = time.monotonic()
            self.comm = join(ports, rank, size, timeout, schedule)
            return {"rank": self.comm.rank, "size": self.comm.size,
                    "seconds": time.monotonic() - t0}

        def join_outcome(self, ports: list[str], rank: int, size: int, timeout: float,
                         schedule: str = "doubling") -> dict:
            """join(), with a RendezvousError returned as fields (one result per rank)."""
            t0 = time.monotonic()
            try:
                return {"error": None, **self.join(ports, rank, size, timeout,
                                                   schedule=schedule)}
            except RendezvousError as exc:
                return {"error": str(exc), "raised_on": exc.rank,
                        "missing_rank": exc.missing_rank, "seconds": time.monotonic() - t0}

        def join_with_stuck_step(self, ports: list[str], rank: int, size: int,
                                 timeout: float) -> dict:
            """join() while this rank's final step never returns (a wedged MPI call)."""
            import distbackprop.comm.mpi as mpi
            verify = mpi._verify
            mpi._verify = lambda *args: time.sleep(3600)
            try:
                return self.join(ports, rank, size, timeout)
            finally:
                mpi._verify = verify

        def tiny_check(self) -> tuple[int, float, float]:
            ranks = np.array([float(self.comm.rank)])
            self.comm.allreduce_(ranks)
            return self.comm.rank, float(ranks[0]), flag_max(self.comm, float(self.comm.rank))

        def run_body(self) -> dict:
            return body.run_comm_body(self.comm)

        def ports_all_closed(self) -> bool:
            # MPICH hands out the lowest free port tag: if join closed every port it
            # opened, a fresh port gets tag 0 again.
            from distbackprop.comm.mpi import close_ports, open_ports
            port = open_ports(0, 2)
            try:
                return port.startswith("tag#0$")
            finally:
                close_ports(port)

        def close(self) -> None:
            self.comm.close()

        def ping(self) -> str:
            return "pong"

    return ray, CommActor


def _open_ports(ray, actors, schedule: str = "doubling") -> list[str]:
    """Phase one of the rendezvous: every actor opens the ports it leads, concurrently."""
    size = len(actors)
    return ray.get([a.open_ports.remote(r, size, schedule) for r, a in enumerate(actors)],
                   timeout=60)


def _kill_and_reap(ray, actors, pids) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
    psutil = require_module("psutil")
    deadline = time.monotonic() + 20
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive, f"actor processes {alive} still running after ray.kill"


@pytest.mark.ray
@pytest.mark.mpi
def test_body_on_mpi_comm_over_ray_actors(ray_cluster):
    ray, CommActor = _comm_actor_class()
    actors = [CommActor.remote() for _ in range(2)]
    pids = ray.get([a.pid.remote() for a in actors], timeout=60)
    try:
        ports = _open_ports(ray, actors)
        joined = ray.get([a.join.remote(ports, r, 2, JOIN_TIMEOUT)
                          for r, a in enumerate(actors)], timeout=JOIN_TIMEOUT + 10)
        assert [(j["rank"], j["size"]) for j in joined] == [(0, 2), (1, 2)]
        assert ray.get(actors[0].ports_all_closed.remote(), timeout=30)
        results = ray.get([a.run_body.remote() for a in actors], timeout=120)
        assert [r["rank"] for r in results] == [0, 1]
        assert all(r["size"] == 2 and r["allreduce_cases"] == 30 for r in results)
        assert all(r["shared"] for r in results)  # one machine: ranks share memory
        ray.get([a.close.remote() for a in actors], timeout=30)
    finally:
        _kill_and_reap(ray, actors, pids)


@pytest.mark.ray
@pytest.mark.mpi
def test_three_actors_arriving_in_reverse_order_get_their_actor_index(ray_cluster):
    """Rank 2 reaches join first, rank 0 last: ranks still equal actor indices."""
    ray, CommActor = _comm_actor_class()
    actors = [CommActor.remote() for _ in range(3)]
    pids = ray.get([a.pid.remote() for a in actors], timeout=60)
    try:
        ports = _open_ports(ray, actors)
        joined = ray.get([a.join.remote(ports, r, 3, JOIN_TIMEOUT, delay=0.4 * (2 - r))
                          for r, a in enumerate(actors)], timeout=JOIN_TIMEOUT + 10)
        assert [(j["rank"], j["size"]) for j in joined] == [(0, 3), (1, 3), (2, 3)]
        # Tiny collectives only: 3 busy-polling ranks on 2 cores.
        checks = ray.get([a.tiny_check.remote() for a in actors], timeout=60)
        assert checks == [(0, 3.0, 2.0), (1, 3.0, 2.0), (2, 3.0, 2.0)]
        assert ray.get(actors[0].ports_all_closed.remote(), timeout=30)
        ray.get([a.close.remote() for a in actors], timeout=30)
    finally:
        _kill_and_reap(ray, actors, pids)


@pytest.mark.ray
@pytest.mark.mpi
def test_rendezvous_that_cannot_complete_names_the_missing_rank(ray_cluster):
    """Size 2, but only one side arrives: both sides fail within the timeout, no hang."""
    ray, CommActor = _comm_actor_class()
    a, b = CommActor.remote(), CommActor.remote()
    pids = ray.get([a.pid.remote(), b.pid.remote()], timeout=60)
    try:
        port_a = ray.get(a.open_ports.remote(0, 2), timeout=60)  # a joins as rank 0; no rank 1
        port_b = ray.get(a.open_ports.remote(0, 2), timeout=60)  # b joins as rank 1; rank 0 never
        t0 = time.monotonic()
        lonely_root = a.join.remote([port_a, ""], 0, 2, SHORT_TIMEOUT)
        lonely_newcomer = b.join.remote([port_b, ""], 1, 2, SHORT_TIMEOUT)
        with pytest.raises(RendezvousError) as root_err:
            ray.get(lonely_root, timeout=SHORT_TIMEOUT + 30)
        with pytest.raises(RendezvousError) as newcomer_err:
            ray.get(lonely_newcomer, timeout=SHORT_TIMEOUT + 30)
        elapsed = time.monotonic() - t0
        # Bounded by the rendezvous timeout (plus Ray's round trip), not by a hang.
        assert elapsed < SHORT_TIMEOUT + 10, elapsed
        assert "rank 1 did not join" in str(root_err.value)
        assert root_err.value.missing_rank == 1 and root_err.value.rank == 0
        assert "rank 0 did not accept rank 1" in str(newcomer_err.value)
        assert newcomer_err.value.missing_rank == 0
        # MPI returned cleanly: both processes still answer, and a's ports can be released.
        assert ray.get([a.ping.remote(), b.ping.remote()], timeout=30) == ["pong"] * 2
        ray.get(a.close_ports.remote(port_b), timeout=30)
        assert ray.get(a.ports_all_closed.remote(), timeout=30)
    finally:
        _kill_and_reap(ray, [a, b], pids)


class _QuarterCpuActors:
    """Eight actors of a quarter CPU each, shared by the tests below (starting eight Ray
    workers costs ~10 s here). A test that leaves a failed rendezvous behind takes them
    with `spoil=True`: stale MPI state must not reach another test, which then gets fresh
    ones. Every process started is stopped by PID at the end of the module."""

    def __init__(self, ray, actor_cls) -> None:
        self.ray, self.actor_cls = ray, actor_cls
        self.actors: list = []
        self.pids: list[int] = []
        self.spoiled = False

    def take(self, spoil: bool = False) -> list:
        if self.spoiled or not self.actors:
            self.close()
            self.actors = [self.actor_cls.options(num_cpus=0.25).remote() for _ in range(8)]
            self.pids = self.ray.get([a.pid.remote() for a in self.actors], timeout=60)
        self.spoiled = spoil
        return self.actors

    def close(self) -> None:
        actors, pids, self.actors, self.pids = self.actors, self.pids, [], []
        if actors:
            _kill_and_reap(self.ray, actors, pids)


@pytest.fixture(scope="module")
def quarter_cpu_actors(ray_cluster):
    pool = _QuarterCpuActors(*_comm_actor_class())
    yield pool
    pool.close()


@pytest.mark.ray
@pytest.mark.mpi
def test_every_size_from_2_to_8_on_both_schedules_gets_ranks_equal_to_actor_indices(
        quarter_cpu_actors):
    """For N = 2..8 and both schedules the first N actors form a group whose ranks are
    their indices and whose allreduce of ranks is right; afterwards every leader has
    closed every port it opened."""
    ray, actors = quarter_cpu_actors.ray, quarter_cpu_actors.take()
    for size in range(2, 9):
        for schedule in ("doubling", "sequential"):
            group = actors[:size]
            ports = _open_ports(ray, group, schedule)
            joined = ray.get([a.join.remote(ports, r, size, JOIN_TIMEOUT, schedule=schedule)
                              for r, a in enumerate(group)], timeout=JOIN_TIMEOUT + 10)
            assert [(j["rank"], j["size"]) for j in joined] == \
                [(r, size) for r in range(size)], (size, schedule)
            checks = ray.get([a.tiny_check.remote() for a in group], timeout=60)
            total = float(size * (size - 1) // 2)
            assert checks == [(r, total, size - 1.0) for r in range(size)], (size, schedule)
            ray.get([a.close.remote() for a in group], timeout=30)
    assert ray.get([a.ports_all_closed.remote() for a in actors], timeout=30) == [True] * 8


# (size, the rank that never joins): what every other rank's error says, and the rank it
# names (None: it waited for a larger group, and names the group).
NEVER_JOINS = {
    (8, 5): {4: ("rank 5 did not join the MPI group", 5),
             6: ("ranks 4..5 did not accept ranks 6..7 into the MPI group", None),
             7: ("ranks 4..5 did not accept ranks 6..7 into the MPI group", None),
             **{r: ("ranks 4..7 did not join the MPI group", None) for r in range(4)}},
}  # rank 0 or 1 of 2 never joining: test_rendezvous_that_cannot_complete_names_the_missing_rank


@pytest.mark.ray
@pytest.mark.mpi
@pytest.mark.parametrize("size,missing", sorted(NEVER_JOINS))
def test_a_rank_that_never_joins_is_named_within_the_timeout(quarter_cpu_actors, size,
                                                             missing):
    """Doubling: the missing rank opens its ports but never calls join. Its round-0
    partner names it; the ranks that waited for its group name the group; all within
    the timeout, and every process stays responsive with every port closed."""
    ray, actors = quarter_cpu_actors.ray, quarter_cpu_actors.take(spoil=True)[:size]
    ports = _open_ports(ray, actors)
    t0 = time.monotonic()
    joining = [r for r in range(size) if r != missing]
    outcomes = ray.get([actors[r].join_outcome.remote(ports, r, size, SHORT_TIMEOUT)
                        for r in joining], timeout=SHORT_TIMEOUT + 30)
    elapsed = time.monotonic() - t0
    assert elapsed < SHORT_TIMEOUT + 10, elapsed
    got = dict(zip(joining, outcomes, strict=True))
    for r, (text, names) in NEVER_JOINS[(size, missing)].items():
        assert got[r]["error"] is not None and text in got[r]["error"], (r, got[r])
        assert (got[r]["raised_on"], got[r]["missing_rank"]) == (r, names), (r, got[r])
        assert got[r]["seconds"] <= SHORT_TIMEOUT + 2, (r, got[r])  # not the safety net
    assert ray.get([a.ping.remote() for a in actors], timeout=30) == ["pong"] * size
    ray.get(actors[missing].close_ports.remote(ports[missing]), timeout=30)
    assert ray.get([a.ports_all_closed.remote() for a in actors], timeout=30) == [True] * size


# ---------------------------------------------------------------- MpiComm under mpiexec ----

@pytest.mark.mpi
def test_body_on_mpi_comm_under_mpiexec():
    mpiexec = require_tool("mpiexec")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [mpiexec, "-n", "2", sys.executable, "-m", "tests.comm.mpi_main"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and its ranks share the session
        proc.communicate()
        pytest.fail("mpiexec -n 2 did not finish within 90 s")
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    oks = sorted(line for line in out.replace("COMM-BODY-OK", "\nCOMM-BODY-OK").splitlines()
                 if line.startswith("COMM-BODY-OK"))
    assert len(oks) == 2, out
    assert '"rank": 0' in oks[0] + oks[1] and '"rank": 1' in oks[0] + oks[1]
    assert all('"shared": true' in line for line in oks), oks


@pytest.mark.ray
@pytest.mark.mpi
def test_rendezvous_step_that_mpi_never_returns_from_still_ends_in_an_error(ray_cluster):
    """Past MPI's own timeouts: rank 1 wedges after connecting, so rank 0 blocks in the
    verifying allreduce; both callers get an error at timeout + grace, and the processes
    (whose MPI is now unusable) are stopped by PID."""
    ray, CommActor = _comm_actor_class()
    actors = [CommActor.remote() for _ in range(2)]
    pids = ray.get([a.pid.remote() for a in actors], timeout=60)
    timeout = 3.0
    try:
        ports = _open_ports(ray, actors)
        refs = [actors[0].join.remote(ports, 0, 2, timeout),
                actors[1].join_with_stuck_step.remote(ports, 1, 2, timeout)]
        for ref in refs:
            with pytest.raises(RendezvousError, match="still blocked .*stop the process"):
                ray.get(ref, timeout=timeout + 30)
    finally:
        _kill_and_reap(ray, actors, pids)
