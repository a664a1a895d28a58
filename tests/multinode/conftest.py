"""Fixtures for the multi-node tests: one namespaced Ray cluster per session.

The harness is `distbackprop.runtime.localcluster` (a way to rehearse a cluster on one
machine); these are the tests' fixtures and helpers around it.

`multinode_cluster` is a head with 0 CPUs (so actors land on worker nodes) and worker
nodes ``n1``, ``n2``, ``n3`` with 1 CPU each, every worker node in its own PID, UTS and
IPC namespaces. Tests may kill and restart nodes (`Cluster.kill_node`,
`Cluster.restart_node`); a test that leaves a node dead must restart it before it
ends (`restore_nodes` does that for every test that asks for it), so the next test
finds the full cluster.

Needs root (for the namespaces), util-linux `unshare`, and the `ray` CLI; without
them the tests skip, and under CI=true they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distbackprop.runtime.localcluster import Cluster, package_env, unavailable
from tests.conftest import IN_CI, require_module, require_tool

REPO = Path(__file__).resolve().parents[2]
WORKER_NODES = ("n1", "n2", "n3")


def _require(ok: bool, why: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{why} (CI=true: a missing prerequisite is a failure, not a skip)")
    pytest.skip(why)


def require_namespaces() -> None:
    """Root, `unshare`, `ray` and mpi4py: what every multi-node test needs."""
    require_module("ray")
    require_module("mpi4py")
    require_tool("unshare")
    require_tool("ray")
    why = unavailable()
    _require(why is None, why or "")


def node_env() -> dict[str, str]:
    """Environment of every node: the package under test first on the path."""
    return package_env()


def driver_env(cluster: Cluster) -> dict[str, str]:
    """Environment of a driver (the CLI) that joins `cluster`: explicit address only."""
    return cluster.driver_env()


def train_command(cluster: Cluster | None, out: Path, *args: str,
                  env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `python -m distbackprop train ARGS --out OUT` against
    `cluster` (None: whatever ARGS say, e.g. --local), for `subprocess`."""
    cmd = [sys.executable, "-m", "distbackprop", "train", *args, "--out", str(out),
           "--metrics-port", "0", "--quiet"]
    full_env = cluster.driver_env() if cluster is not None else dict(os.environ)
    if cluster is not None:
        cmd += ["--ray-address", cluster.address]
    full_env.update(env or {})
    return cmd, full_env


_PLACEABLE = """
import sys, time
import ray
from distbackprop.runtime.raysession import placeable_workers
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
end = time.monotonic() + float(sys.argv[3])
while placeable_workers(1) < int(sys.argv[2]):
    if time.monotonic() > end:
        sys.exit(f"room for fewer than {sys.argv[2]} more workers after {sys.argv[3]} s")
    time.sleep(0.25)
"""


def wait_placeable(cluster: Cluster, n: int, timeout: float = 60.0) -> None:
    """Until a driver of `cluster` sees room for `n` more 1-CPU workers on its free
    resources (what an elastic run's capacity check reads: a node that is alive in the GCS
    may not have reported its CPUs yet)."""
    r = subprocess.run([sys.executable, "-c", _PLACEABLE, cluster.address, str(n), str(timeout)],
                       capture_output=True, text=True, timeout=timeout + 60,
                       env=cluster.driver_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]


def train(cluster: Cluster | None, out: Path, *args: str, timeout: float = 300,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `train_command(...)` to the end and capture its output."""
    cmd, full_env = train_command(cluster, out, *args, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO)


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory):
    """Head (0 CPUs, host namespaces) + n1, n2, n3 (1 CPU each, own PID/UTS/IPC namespaces)."""
    require_namespaces()
    t0 = time.monotonic()
    # Faster verdicts on a vanished node than Ray's default (~14 s: a 3 s period × 5
    # misses), as deploy/README.md suggests for real clusters: each node-loss test waits
    # for one, and a node is still given 6 s to answer before it is declared dead.
    health = {"RAY_health_check_period_ms": "2000", "RAY_health_check_failure_threshold": "3"}
    cluster = Cluster(tmp_path_factory.mktemp("multinode"), env={**node_env(), **health})
    with cluster:
        cluster.add_nodes(list(WORKER_NODES))
        cluster.timings["cluster_start"] = time.monotonic() - t0
        yield cluster
    leaked = [p for p in cluster.pids() if os.path.exists(f"/proc/{p}")]
    assert not leaked, f"cluster processes outlived stop(): {leaked}"


@pytest.fixture
def restore_nodes(multinode_cluster):
    """After the test: start again every worker node it killed, and wait for it."""
    yield multinode_cluster
    for name in WORKER_NODES:
        node = multinode_cluster.nodes[name]
        if not node.running():
            multinode_cluster.restart_node(name)
