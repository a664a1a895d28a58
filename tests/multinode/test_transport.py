"""A rank in a container that shares the host's IPC namespace but not its PID namespace.

Topology (a cluster of its own, since it differs from the session's): the head, with
1 CPU, in the host's namespaces, and node ``s1`` in its own PID and UTS namespaces
but the host's IPC namespace (`unshare -p -f -u --mount-proc`, like a container run
with ``--ipc=host``). UCX's shared memory then fails between the two ranks (measured:
MPI_Comm_connect fails at once) unless the rank in the child namespace is limited to
TCP, which `distbackprop.comm.transport.transport_env` decides before MPI_Init.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from distbackprop.comm.transport import FIX_HINT
from distbackprop.nn.model import load_model
from distbackprop.runtime.localcluster import Cluster
from tests.multinode.conftest import REPO, driver_env, node_env, require_namespaces, train

pytestmark = pytest.mark.ray

ARGS = ("--dtype", "float64", "--max-steps", "20", "--hidden", "16", "--seed", "4")


@pytest.fixture(scope="module")
def shared_ipc_cluster(tmp_path_factory):
    require_namespaces()
    with Cluster(tmp_path_factory.mktemp("sharedipc"), head_cpus=1, env=node_env()) as c:
        c.add_node("s1", ipc="shared")
        yield c


def _probe(cluster: Cluster, timeout: float, env: dict | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", "tests.multinode.rendezvous_probe", cluster.address,
           str(timeout), json.dumps(env or {})]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120,
                       env=driver_env(cluster), cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_shared_ipc_node_forms_the_group_over_tcp(shared_ipc_cluster):
    c = shared_ipc_cluster
    ranks = _probe(c, timeout=30)
    by_node = {c.node_name(r["node_id"]): r for r in ranks}
    assert set(by_node) == {"head", "s1"}, ranks
    assert all(r["ok"] and r["sum"] == 3.0 for r in ranks), ranks
    # Only the rank in the child PID namespace needed to leave shared memory.
    assert by_node["s1"]["transport"] == {"UCX_TLS": "tcp,self"}, by_node["s1"]
    assert by_node["head"]["transport"] == {}, by_node["head"]
    print(f"rendezvous head<->s1: {max(r['seconds'] for r in ranks):.2f} s")


def test_without_the_fallback_the_failure_names_the_fix(shared_ipc_cluster):
    """An explicit UCX_TLS wins over the automatic choice; with shared memory allowed the
    rendezvous fails once, at once, naming UCX_TLS=tcp,self (no silent retries).

    The rank in s1 fails because UCX's shared-memory endpoint reads the peer's
    /proc/<pid>/stat, and the host rank's PID is not in s1's PID namespace. PIDs wrap at
    pid_max (32768 here), so after many processes the host rank's PID can name a live
    process inside s1 too; UCX then gets past that check and the failure changes shape
    (measured: rank 0 fails at once, rank 1 waits out its timeout). Such a draw is
    repeated with fresh actors, which get fresh PIDs."""
    c = shared_ipc_cluster
    for _ in range(5):
        ranks = _probe(c, timeout=15, env={"UCX_TLS": "all"})
        if not any(r["sees_peer_pid"] for r in ranks if c.node_name(r["node_id"]) == "s1"):
            break
    else:
        pytest.fail(f"the host rank's PID was alive inside s1 in 5 draws: {ranks}")
    assert {c.node_name(r["node_id"]) for r in ranks} == {"head", "s1"}, ranks
    assert not any(r["ok"] for r in ranks), ranks
    assert all(r["transport"] == {} and r["UCX_TLS"] == "all" for r in ranks), ranks
    # The newcomer's Connect fails at once and names the fix; rank 0's Accept gives up
    # at the timeout (it cannot tell a broken transport from a late peer).
    fast = [r for r in ranks if r["seconds"] < 5]
    assert [r["rank"] for r in fast] == [1], ranks
    assert FIX_HINT in fast[0]["error"] and "UCX_TLS=tcp,self" in fast[0]["error"], ranks
    slow = next(r for r in ranks if r["rank"] == 0)
    assert slow["seconds"] <= 15 + 3, slow


def test_training_across_shared_ipc_equals_local(shared_ipc_cluster, tmp_path):
    c = shared_ipc_cluster
    before = {a["actor_id"] for a in c.actor_table("_ActorBody")}
    spread = train(c, tmp_path / "spread", "--workers", "2", "--placement", "spread", *ARGS,
                   "--rendezvous-timeout", "30")
    assert spread.returncode == 0, spread.stderr[-3000:]
    local = train(None, tmp_path / "local", "--local", *ARGS)
    assert local.returncode == 0, local.stderr[-3000:]
    ref = load_model(tmp_path / "local" / "model.npz").params
    got = load_model(tmp_path / "spread" / "model.npz").params
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-9
    summary = json.loads((tmp_path / "spread" / "summary.json").read_text())
    assert summary["restarts"] == 0, summary  # formed the first time
    assert summary["gradient_exchange"] == "mpi", summary  # another host name: MPI over TCP
    nodes = {a["node"] for a in c.actor_table("_ActorBody") if a["actor_id"] not in before}
    assert nodes == {"head", "s1"}, nodes
