"""Several nodes for real: training spread over namespaced nodes, and a group's shutdown.

The cluster is the session's `multinode_cluster`: a head with 0 CPUs and worker
nodes n1..n3, each in its own PID, UTS and IPC namespaces (conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from distbackprop.nn.model import load_model
from tests.multinode.conftest import REPO, driver_env, train

pytestmark = pytest.mark.ray

ARGS = ("--dtype", "float64", "--max-steps", "30", "--hidden", "16", "--batch-size", "64",
        "--seed", "3", "--chunk-steps", "10")


def test_nodes_are_separate_machines(multinode_cluster):
    """Each worker node has its own PID, UTS and IPC namespaces and its own PID block."""
    c = multinode_cluster
    running = [n for n in c.worker_nodes() if n.running()]
    rows = [r for r in c.node_table() if r["alive"]]
    assert len(rows) == 1 + len(running) and len(running) >= 3, rows
    seen: dict[str, set] = {"pid": set(), "uts": set(), "ipc": set()}
    for node in running:
        init = node.init_pid()
        assert init is not None, node.name
        for kind in seen:
            seen[kind].add(subprocess.run(["readlink", f"/proc/{init}/ns/{kind}"],
                                          capture_output=True, text=True).stdout)
        with open(f"/proc/{init}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()
        assert nspid[-1] == "1", nspid  # the node's init is PID 1 inside
    assert all(len(v) == len(running) for v in seen.values()), seen
    print(f"cluster start {c.timings}")


def _params(run_dir) -> np.ndarray:
    return load_model(run_dir / "model.npz").params


def test_spread_over_two_nodes_equals_local(multinode_cluster, tmp_path):
    c = multinode_cluster
    before = {a["actor_id"] for a in c.actor_table("_ActorBody")}
    spread = train(c, tmp_path / "spread", "--workers", "2", "--placement", "spread", *ARGS)
    assert spread.returncode == 0, spread.stderr[-3000:]
    local = train(None, tmp_path / "local", "--local", *ARGS)
    assert local.returncode == 0, local.stderr[-3000:]

    ref, got = _params(tmp_path / "local"), _params(tmp_path / "spread")
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= 1e-9, rel
    summary = json.loads((tmp_path / "spread" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["workers"] == 2 and summary["restarts"] == 0
    # two machines: the sharded update's Reduce_scatter + Allgather, no shared memory
    assert summary["gradient_exchange"] == "mpi", summary

    # Where the ranks ran, from Ray's own record of the run's actors.
    actors = [a for a in c.actor_table("_ActorBody") if a["actor_id"] not in before]
    assert len(actors) == 2, actors
    nodes = {a["node"] for a in actors}
    assert len(nodes) == 2 and None not in nodes and "head" not in nodes, actors
    assert all(a["state"] == "DEAD" for a in actors), actors  # shut down after the run
    for a in actors:  # each actor's PID is from its node's own PID block
        assert c.node_of_pid(a["pid"]) == a["node"], a


def _probe(cluster, workers: int = 2) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.multinode.group_probe", cluster.address,
                        str(workers)], capture_output=True, text=True, timeout=240,
                       env=driver_env(cluster), cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_shutdown_signals_no_local_process_for_remote_actors(multinode_cluster):
    """RayGroup.shutdown with the ranks on other nodes: no local kill or wait by PID (their
    PIDs are numbers of other namespaces), yet every actor ends dead and its process gone."""
    c = multinode_cluster
    rep = _probe(c)
    print(f"group start {rep['start_seconds']:.2f} s, phases {rep['phases']}, "
          f"shutdown {rep['shutdown_seconds']:.2f} s")
    assert rep["local_ranks"] == []
    assert len(set(rep["nodes"])) == 2 and rep["driver_node"] not in rep["nodes"], rep
    assert rep["seen"] == {"os.kill": [], "os.killpg": [], "psutil.Process": []}, rep["seen"]

    table = {a["actor_id"]: a for a in c.actor_table("_ActorBody")}
    for aid, pid, nid in zip(rep["actor_ids"], rep["pids"], rep["nodes"], strict=True):
        assert table[aid]["state"] == "DEAD", table[aid]
        name = c.node_of_pid(pid)
        assert name is not None and c.nodes[name].node_id == nid, (pid, nid)
        # Dead for Ray first; the process on the node exits moments later.
        deadline = time.monotonic() + 10
        while c.host_pid(name, pid) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.host_pid(name, pid) is None, f"rank process {pid} still runs on {name}"
    assert rep["shutdown_seconds"] < 15, rep
