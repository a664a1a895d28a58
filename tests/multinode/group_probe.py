"""A driver that forms a `RayGroup` on a running cluster, shuts it down, and reports.

    python -m tests.multinode.group_probe ADDRESS [WORKERS]

Joins the cluster at ADDRESS, starts a group of WORKERS (default 2) actors spread
over the nodes (actor start + MPI rendezvous), then calls `shutdown()` with every
local process signal and wait spied on: `os.kill`, `os.killpg` and `psutil.Process`
record the PIDs they are given. Prints one JSON line: the ranks' PIDs and node
ids, the driver's node id, what the spies saw, and the timings.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> None:
    address = argv[0]
    workers = int(argv[1]) if len(argv) > 1 else 2
    import psutil
    import ray

    from distbackprop import TrainConfig
    from distbackprop.runtime import group as group_mod
    from distbackprop.runtime.group import GroupSpec, RayGroup
    from distbackprop.runtime.worker import ReplicaSpec

    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    cfg = TrainConfig(workers=workers, placement="spread", hidden=(8,), max_steps=4,
                      metrics_port=0, quiet=True)
    # the embedded digits: 64 features, 10 classes (each actor reads them itself)
    spec = GroupSpec(ReplicaSpec(cfg, 64, 10, "cross_entropy", 4))

    # Time the rendezvous on its own: RayGroup.start gathers each phase through _gather.
    phases: dict[str, float] = {}
    real_gather = RayGroup._gather

    def timed_gather(self, refs, deadline, what):
        t = time.monotonic()
        try:
            return real_gather(self, refs, deadline, what)
        finally:
            phases[what] = phases.get(what, 0.0) + time.monotonic() - t

    RayGroup._gather = timed_gather
    group = RayGroup(spec, workers, rendezvous_timeout=60)
    t0 = time.monotonic()
    group.start()
    start_s = time.monotonic() - t0

    seen: dict[str, list[int]] = {"os.kill": [], "os.killpg": [], "psutil.Process": []}
    real_kill, real_killpg, real_process = os.kill, os.killpg, psutil.Process

    def spy_kill(pid, sig):
        seen["os.kill"].append(int(pid))
        return real_kill(pid, sig)

    def spy_killpg(pgid, sig):
        seen["os.killpg"].append(int(pgid))
        return real_killpg(pgid, sig)

    class SpyProcess(real_process):
        def __init__(self, pid=None, *a, **kw):
            seen["psutil.Process"].append(int(pid) if pid is not None else os.getpid())
            super().__init__(pid, *a, **kw)

    os.kill, os.killpg, psutil.Process = spy_kill, spy_killpg, SpyProcess
    pids = list(group.pids)
    actor_ids = [a._actor_id.hex() for a in group.actors]
    t1 = time.monotonic()
    try:
        group.shutdown()
    finally:
        os.kill, os.killpg, psutil.Process = real_kill, real_killpg, real_process
    shutdown_s = time.monotonic() - t1
    report = {
        "driver_node": ray.get_runtime_context().get_node_id(),
        "pids": [int(p) for p in pids],
        "nodes": [getattr(p, "node_id", None) for p in pids],
        "identities": [getattr(p, "identity", None) for p in pids],
        "actor_ids": actor_ids,
        "local_ranks": sorted(group_mod._local_ranks(pids)),
        "seen": seen,
        "start_seconds": start_s,
        "phases": phases,
        "shutdown_seconds": shutdown_s,
    }
    ray.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
