"""A way to rehearse a cluster on one machine: a Ray head plus namespaced worker nodes.

Each worker node is `ray start --address=HEAD --block` run inside
`unshare -p -f -u -i --mount-proc`: its own PID, hostname (UTS) and System V IPC
namespaces, as a separate machine would have, while every node still listens on
127.0.0.1 (one network namespace), each on ports of its own. SIGKILL of the
namespace's first process (PID 1 inside) makes the kernel kill every process in
the namespace at once: the machine is gone, with no chance to say goodbye to the
GCS. A node started with ``ipc="shared"`` keeps the host's IPC namespace
(``unshare -p -f -u --mount-proc``), like a container run with ``--ipc=host``.
Needs root (for the namespaces), util-linux `unshare` and the `ray` CLI
(`unavailable()` says what is missing).

The head runs in the host's namespaces (the driver, i.e. the coordinator, runs
beside it, as on a real head node), in a session of its own so that it can be
stopped without touching any other Ray instance on the machine.

Nothing here uses Ray's default temp dir: every node gets a `--temp-dir` under a
private directory, so no ``/tmp/ray/ray_current_cluster`` file is written that a
later ``ray.init()`` elsewhere would attach to. Callers always pass the explicit
``cluster.address``. The multi-node tests, ``bench scaling`` (2 workers on 2 nodes) and
``bench nodeloss`` (a node killed mid-run) use it; deploy/README.md shows how to start
one from Python or by hand.

Usage::

    with Cluster(root, env=package_env()) as c:   # starts the head (0 CPUs)
        c.add_nodes(["n1", "n2"])       # worker nodes, 1 CPU each, started together
        c.add_node("s1", ipc="shared")  # own PID/UTS namespaces, the host's IPC
        run_driver(c.address)           # always the explicit address, with
                                        # c.driver_env() for a driver subprocess
        c.node_of_pid(actor_pid)        # which node a PID (as seen inside a node) is on
        c.actor_table("_ActorBody")     # Ray's record of actors: state, node, PID
        c.kill_node("n1")               # SIGKILL the namespace: the machine is gone
        c.wait_node_dead("n1")          # until the GCS says so (its health checks)
        c.restart_node("n1")            # a fresh node (a new Ray node id), same ports

Measured on the 2-core test machine: head 6.6-13 s, three worker nodes started
together 12-17 s; the GCS marks a killed node dead 13-14 s after the SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Fixed listening ports come from below the kernel's ephemeral range (32768+ by
# default), so an outgoing connection can never be holding one of them.
PORT_LOW, PORT_HIGH = 20000, 32000
# Ports one node needs: node manager, object manager, dashboard agent (http,
# grpc), metrics export, runtime-env agent, then a range for its worker processes.
_NODE_FIXED_PORTS = 6
_WORKER_PORTS = 24
_HEAD_EXTRA_PORTS = 2  # GCS, Ray client server
_NODE_BLOCK = _NODE_FIXED_PORTS + _WORKER_PORTS

# Worker node k numbers its processes from k * PID_STRIDE up (ns_last_pid), so a PID seen
# in some node's namespace tells which node it is on, and no two nodes share a PID. Below
# the default pid_max of 32768; a node uses a few hundred PIDs (threads count) in a test.
PID_STRIDE = 3000

# Every node's environment: no token auth (the tests' convention), no usage-stats
# reporting (it tries the internet at start-up and costs seconds on a closed network).
BASE_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# Variables that would redirect a node or its workers to another cluster or MPI setup.
_DROP_ENV = ("RAY_ADDRESS", "UCX_", "FI_", "MPIR_CVAR_")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Port blocks come from a generator of their own (something in the process reseeded the
# module-level one: two nodes started together once drew the same block) and are kept
# out of later draws in this process (a node started without waiting binds its ports
# only seconds later, so a free-port check alone cannot see it).
_PORTS_RNG = random.Random()
_PORTS_TAKEN: list[tuple[int, int]] = []


def pick_port_block(n: int, tries: int = 200) -> int:
    """First port of `n` consecutive free ports at a random base in [PORT_LOW, PORT_HIGH).

    Random, so that other engineers' (and other sessions') clusters on this machine are
    unlikely to be on the same block; checked, so that a busy block is skipped; never a
    block overlapping one this process handed out before.
    """
    for _ in range(tries):
        base = _PORTS_RNG.randrange(PORT_LOW, PORT_HIGH - n)
        if any(base < b + m and b < base + n for b, m in _PORTS_TAKEN):
            continue
        if all(_port_free(p) for p in range(base, base + n)):
            _PORTS_TAKEN.append((base, n))
            return base
    raise RuntimeError(f"no block of {n} free ports in {PORT_LOW}..{PORT_HIGH}")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    return kids


def session_pids(sid: int) -> list[int]:
    """PIDs of every live process in session `sid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
    return out


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _ns_pids(ns: str) -> list[int]:
    """Host PIDs of every process whose PID namespace is `ns` (a readlink of ns/pid)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pid_ns(int(entry)) == ns:
            out.append(int(entry))
    return out


def ray_executable() -> str:
    """`ray` beside this interpreter (the venv's console script), else from PATH."""
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise FileNotFoundError("the ray CLI is not installed")
    return found


def unavailable() -> str | None:
    """Why the harness cannot run on this machine (None: it can): it needs root for the
    namespaces, util-linux `unshare`, and the `ray` CLI."""
    if os.geteuid() != 0:
        return "the namespaced harness needs root (PID/UTS/IPC namespaces)"
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    try:
        ray_executable()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def package_env() -> dict[str, str]:
    """`PYTHONPATH` with the directory this package is imported from first: the workers
    Ray starts inherit their node's environment, not the driver's, so a node started
    with it runs the same distbackprop as the driver."""
    here = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": here + (os.pathsep + path if path else "")}


@dataclass
class Node:
    """One Ray node of the cluster and the process tree that is its "machine"."""

    name: str
    head: bool
    ipc: str  # "own": a private IPC namespace; "shared": the host's
    num_cpus: int
    base_port: int
    temp_dir: Path
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    node_id: str | None = None  # Ray's hex node id, once registered
    started_at: float = 0.0
    pid_ns: str | None = None  # the namespace's id (worker nodes), for leak checks
    pid_base: int = 0  # worker nodes: PIDs inside the namespace start above this
    history: list[str] = field(default_factory=list)  # node ids of earlier incarnations

    @property
    def ports(self) -> dict[str, int]:
        b = self.base_port
        return {"node_manager": b, "object_manager": b + 1, "agent_listen": b + 2,
                "agent_grpc": b + 3, "metrics": b + 4, "runtime_env_agent": b + 5,
                "min_worker": b + _NODE_FIXED_PORTS,
                "max_worker": b + _NODE_BLOCK - 1}

    def init_pid(self) -> int | None:
        """Host PID of the namespace's PID 1 (the child `unshare -f` forked); None for
        the head, or once the node is gone."""
        if self.head or self.proc is None or self.proc.poll() is not None:
            return None
        kids = _children(self.proc.pid)
        return kids[0] if kids else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """A head (host namespaces) plus worker nodes in namespaces of their own; see module doc.

    Every process is started by this object and stopped by PID (the head by its
    session, a worker node by its PID namespace), never by name.
    """

    def __init__(self, root: Path, *, head_cpus: int = 0, env: dict[str, str] | None = None,
                 object_store_bytes: int = 80 * 1024 * 1024,
                 start_timeout: float = 90.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # AF_UNIX socket paths (raylet, plasma) live under the temp dir and must fit in
        # 107 bytes: a short private directory rather than pytest's deep tmp_path.
        self.tmp = Path(f"/tmp/dbpmn-{os.getpid()}-{random.randrange(16**6):06x}")
        self.tmp.mkdir(mode=0o755)
        self.head_cpus = head_cpus
        self.object_store_bytes = object_store_bytes
        self.start_timeout = start_timeout
        self.extra_env = dict(env or {})
        self.nodes: dict[str, Node] = {}
        self.gcs_port = 0
        self.client_port = 0
        self.timings: dict[str, float] = {}
        self._gcs = None

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start_head()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _node_env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_ENV)}
        env.update(BASE_ENV)
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    def driver_env(self) -> dict[str, str]:
        """Environment of a driver process (e.g. `distbackprop train --ray-address
        ADDRESS`) joining this cluster: the nodes' settings, no other cluster's address."""
        return self._node_env(None)

    def _common_args(self, node: Node) -> list[str]:
        p = node.ports
        return [
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(node.num_cpus),
            "--object-store-memory", str(self.object_store_bytes),
            "--node-manager-port", str(p["node_manager"]),
            "--object-manager-port", str(p["object_manager"]),
            "--dashboard-agent-listen-port", str(p["agent_listen"]),
            "--dashboard-agent-grpc-port", str(p["agent_grpc"]),
            "--metrics-export-port", str(p["metrics"]),
            "--runtime-env-agent-port", str(p["runtime_env_agent"]),
            "--min-worker-port", str(p["min_worker"]),
            "--max-worker-port", str(p["max_worker"]),
            "--temp-dir", str(node.temp_dir),
            "--disable-usage-stats",
            "--block",
        ]

    def start_head(self) -> Node:
        """Start the head (`ray start --head --block`, 0 CPUs by default) and wait for it."""
        t0 = time.monotonic()
        base = pick_port_block(_NODE_BLOCK + _HEAD_EXTRA_PORTS)
        self.gcs_port, self.client_port = base + _NODE_BLOCK, base + _NODE_BLOCK + 1
        node = Node("head", True, "host", self.head_cpus, base, self.tmp / "head",
                    self.root / "head.log", self._node_env(None))
        cmd = [ray_executable(), "start", "--head", "--port", str(self.gcs_port),
               "--ray-client-server-port", str(self.client_port),
               "--include-dashboard", "false", *self._common_args(node)]
        self._spawn(node, cmd, new_session=True)
        self.nodes[node.name] = node
        node.node_id = self._wait_registered(node)
        self.timings["head_start"] = time.monotonic() - t0
        return node

    def add_node(self, name: str, *, num_cpus: int = 1, ipc: str = "own",
                 env: dict[str, str] | None = None, wait: bool = True) -> Node:
        """Start worker node `name` in namespaces of its own; `ipc="shared"` keeps the
        host's IPC namespace. Waits until the GCS lists it alive (unless `wait=False`)."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        if ipc not in ("own", "shared"):
            raise ValueError(f"ipc must be 'own' or 'shared', got {ipc!r}")
        node = Node(name, False, ipc, num_cpus, pick_port_block(_NODE_BLOCK),
                    self.tmp / name, self.root / f"{name}.log", self._node_env(env))
        node.pid_base = PID_STRIDE * len(self.worker_nodes()) + PID_STRIDE
        if node.pid_base + PID_STRIDE > _pid_max():
            raise ValueError(f"too many worker nodes for pid_max {_pid_max()}")
        self.nodes[name] = node
        self._start_worker(node, wait)
        return node

    def add_nodes(self, names: list[str], **kw) -> list[Node]:
        """`add_node` for each name, started together (their start-up overlaps), then
        waited for."""
        nodes = [self.add_node(n, wait=False, **kw) for n in names]
        for node in nodes:
            self.wait_registered(node.name)
        return nodes

    def wait_registered(self, name: str) -> str:
        """Wait until node `name` (started with wait=False) is alive in the GCS; its id."""
        node = self.nodes[name]
        node.node_id = self._wait_registered(node)
        self.timings[f"{name}_start"] = time.monotonic() - node.started_at
        return node.node_id

    def _start_worker(self, node: Node, wait: bool) -> None:
        t0 = time.monotonic()
        flags = ["-p", "-f", "-u", "--mount-proc"] + (["-i"] if node.ipc == "own" else [])
        # PID 1 inside is a shell that names the host, moves the namespace's PID counter
        # to this node's block, and then waits for `ray start`: a shell as init reaps
        # the orphans Ray leaves, which `ray start` would not.
        script = (f'hostname "$0" && echo {node.pid_base} > /proc/sys/kernel/ns_last_pid '
                  f'&& "$@"')
        cmd = [shutil.which("unshare") or "unshare", *flags, "--", "/bin/sh", "-c", script,
               node.name, ray_executable(), "start", "--address", self.address,
               *self._common_args(node)]
        self._spawn(node, cmd, new_session=True)
        deadline = time.monotonic() + 10
        while node.init_pid() is None and node.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        init = node.init_pid()
        if init is None:
            raise RuntimeError(f"node {node.name}: unshare did not start "
                               f"(log {node.log_path}):\n{self._tail(node)}")
        node.pid_ns = _pid_ns(init)
        if wait:
            node.node_id = self._wait_registered(node)
            self.timings[f"{node.name}_start"] = time.monotonic() - t0

    def _spawn(self, node: Node, cmd: list[str], new_session: bool) -> None:
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        with open(node.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=node.env,
                                         start_new_session=new_session)
        node.started_at = time.monotonic()

    def _tail(self, node: Node, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return node.log_path.read_text(errors="replace")[-n:]
        return ""

    # -- GCS queries ----------------------------------------------------------------

    def gcs(self):
        """A GCS client of the head (no driver connection: the test process may be a
        driver of another Ray instance)."""
        if self._gcs is None:
            from ray._raylet import GcsClient
            self._gcs = GcsClient(address=self.address)
        return self._gcs

    def node_table(self) -> list[dict]:
        """Every node the GCS knows (alive and dead): id, state, temp dir, manager port."""
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        rows = []
        for nid, info in self.gcs().get_all_node_info(timeout=10).items():
            rows.append({
                "node_id": nid.hex(),
                "alive": info.state == GcsNodeInfo.GcsNodeState.ALIVE,
                "temp_dir": info.temp_dir,
                "node_manager_port": info.node_manager_port,
                "is_head": info.is_head_node,
                "death": info.death_info.reason_message if info.death_info else "",
                "end_time_ms": info.end_time_ms,
            })
        return rows

    def actor_table(self, class_name: str | None = None) -> list[dict]:
        """Every actor the GCS knows (dead ones too, until it forgets them): id, class,
        state, the node it was placed on (hex id and harness name), its PID there."""
        import asyncio

        from ray.core.generated.gcs_pb2 import ActorTableData
        async def fetch():  # the client binds its future to the running loop
            return await self.gcs().async_get_all_actor_info(timeout=10)

        reply = asyncio.run(fetch())
        infos = reply.values() if hasattr(reply, "values") else reply
        names = {}
        for n in self.nodes.values():
            for nid in [n.node_id, *n.history]:
                if nid:
                    names[nid] = n.name
        rows = []
        for a in infos:
            if class_name is not None and a.class_name != class_name:
                continue
            raw = a.node_id or a.address.node_id
            nid = raw.hex() if raw else ""
            rows.append({"actor_id": a.actor_id.hex(), "class_name": a.class_name,
                         "state": ActorTableData.ActorState.Name(a.state), "node_id": nid,
                         "node": names.get(nid), "pid": a.pid,
                         "death": a.death_cause.WhichOneof("context") or ""})
        return rows

    def _find_alive(self, node: Node) -> str | None:
        for row in self.node_table():
            if (row["alive"] and row["node_manager_port"] == node.ports["node_manager"]
                    and row["node_id"] not in node.history):
                return row["node_id"]
        return None

    def _wait_registered(self, node: Node) -> str:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not node.running():
                raise RuntimeError(f"node {node.name} exited with {node.proc.returncode} "
                                   f"before joining (log {node.log_path}):\n{self._tail(node)}")
            if node.head and not _port_open(self.gcs_port):
                time.sleep(0.1)
                continue
            with contextlib.suppress(Exception):  # the GCS may not answer yet
                nid = self._find_alive(node)
                if nid:
                    return nid
            time.sleep(0.1)
        raise TimeoutError(f"node {node.name} not alive in the GCS after "
                           f"{self.start_timeout:g} s (log {node.log_path}):\n{self._tail(node)}")

    def wait_nodes_alive(self, n: int, timeout: float = 60.0) -> list[str]:
        """Wait until `n` nodes (the head included) are alive; their ids."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [r["node_id"] for r in self.node_table() if r["alive"]]
            if len(alive) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(alive) < n:
            raise TimeoutError(f"{len(alive)} of {n} nodes alive after {timeout:g} s")
        return alive

    def node_alive(self, name: str) -> bool:
        nid = self.nodes[name].node_id
        return any(r["node_id"] == nid and r["alive"] for r in self.node_table())

    def wait_node_dead(self, name: str, timeout: float = 120.0) -> float:
        """Wait until the GCS marks node `name` dead; seconds waited."""
        t0 = time.monotonic()
        while self.node_alive(name):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"node {name} still alive in the GCS after {timeout:g} s")
            time.sleep(0.1)
        return time.monotonic() - t0

    # -- node loss ------------------------------------------------------------------

    def kill_node(self, name: str) -> float:
        """SIGKILL node `name`'s namespace init: every process of that "machine" dies at
        once (the kernel kills the rest of the PID namespace). Returns time.time() of the
        kill. The GCS learns of it only through its health checks (`wait_node_dead`)."""
        node = self.nodes[name]
        if node.head:
            raise ValueError("kill_node is for worker nodes; the head ends with stop()")
        init = node.init_pid()
        if init is None:
            raise RuntimeError(f"node {name} is not running")
        at = time.time()
        os.kill(init, signal.SIGKILL)
        node.proc.wait(timeout=30)
        self._reap_namespace(node)
        return at

    def _reap_namespace(self, node: Node, timeout: float = 30.0) -> None:
        """Wait until no process is left in the node's PID namespace."""
        if node.pid_ns is None:
            return
        deadline = time.monotonic() + timeout
        while _ns_pids(node.pid_ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _ns_pids(node.pid_ns)
        if left:
            raise RuntimeError(f"node {node.name}: processes {left} outlived their namespace")

    def restart_node(self, name: str, wait: bool = True) -> Node:
        """Start node `name` again (after `kill_node`): a new Ray node on the same ports."""
        node = self.nodes[name]
        if node.running():
            raise RuntimeError(f"node {name} is still running; kill_node it first")
        if node.node_id:
            node.history.append(node.node_id)
        node.node_id = None
        self._start_worker(node, wait)
        return node

    def node_name(self, node_id: str) -> str | None:
        """The harness name of Ray node `node_id` (any incarnation), or None."""
        for node in self.nodes.values():
            if node_id == node.node_id or node_id in node.history:
                return node.name
        return None

    def node_of_pid(self, pid: int) -> str | None:
        """The worker node whose PID block holds `pid` (a PID as seen inside a node, e.g.
        an actor's `os.getpid()`); None if no node's block does."""
        for node in self.worker_nodes():
            if node.pid_base < pid <= node.pid_base + PID_STRIDE:
                return node.name
        return None

    def host_pid(self, name: str, ns_pid: int) -> int | None:
        """Host PID of the process that is `ns_pid` inside node `name`'s namespace."""
        node = self.nodes[name]
        for pid in _ns_pids(node.pid_ns) if node.pid_ns else []:
            try:
                with open(f"/proc/{pid}/status") as f:
                    nspid = next(line for line in f if line.startswith("NSpid:"))
            except (OSError, StopIteration):
                continue
            if int(nspid.split()[-1]) == ns_pid:
                return pid
        return None

    def worker_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if not n.head]

    def pids(self) -> list[int]:
        """Host PIDs of every process of the cluster (for leak checks)."""
        out: list[int] = []
        for node in self.nodes.values():
            if node.head and node.proc is not None:
                out += session_pids(node.proc.pid)
            elif node.pid_ns:
                out += _ns_pids(node.pid_ns)
        return out

    def stop(self) -> None:
        """Stop every node this object started: worker namespaces by SIGKILL of their
        init, then the head's session (SIGTERM, then SIGKILL after 15 s)."""
        for node in self.worker_nodes():
            init = node.init_pid()
            if init is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init, signal.SIGKILL)
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=30)
            with contextlib.suppress(RuntimeError):
                self._reap_namespace(node)
        head = self.nodes.get("head")
        if head is not None and head.proc is not None:
            stop_session(head.proc, grace=15.0)
        self._gcs = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pid_max() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_session(proc: subprocess.Popen, grace: float = 20.0) -> list[int]:
    """SIGTERM session leader `proc`, wait up to `grace` s, then SIGKILL whatever of its
    session is left; returns the PIDs that had to be killed. Only processes in the session
    that `proc` leads are touched."""
    sid = proc.pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and session_pids(sid):
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        else:
            time.sleep(0.2)
    killed = session_pids(sid)
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return killed
