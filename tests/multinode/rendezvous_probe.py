"""A driver that runs distbackprop's MPI rendezvous between two actors on two nodes.

    python -m tests.multinode.rendezvous_probe ADDRESS TIMEOUT [ENV_JSON]

Places two actors with a SPREAD placement group (so one per node), with ENV_JSON (a
dict of environment variables, e.g. '{"UCX_TLS": "all"}') in their runtime env, and
has them form a group with `distbackprop.comm.mpi.open_ports`/`join` and allreduce
over it. Prints one JSON line per rank: its node, the transport environment the
import chose, whether the peer's PID names a live process in this rank's /proc
(``sees_peer_pid``: PIDs are per namespace, and UCX's shared memory looks the peer up
there), and how the join ended (ok, or the error text) and how long it took.
"""

from __future__ import annotations

import json
import sys
import time


class Peer:
    """One rank; MPI is initialised on the first call that imports distbackprop.comm.mpi."""

    def where(self) -> dict:
        import os
        import socket

        import ray
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "hostname": socket.gethostname()}

    def sees_pid(self, pid: int) -> bool:
        """Is there a process `pid` in this process's PID namespace (its /proc)?"""
        import os
        return os.path.exists(f"/proc/{pid}")

    def open_ports(self, rank: int, size: int) -> str:
        from distbackprop.comm.mpi import open_ports
        return open_ports(rank, size)

    def join(self, ports: list[str], rank: int, size: int, timeout: float) -> dict:
        import os

        import numpy as np

        from distbackprop.comm import mpi
        t0 = time.monotonic()
        try:
            comm = mpi.join(ports, rank, size, timeout)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return {"ok": False, "error": str(exc), "seconds": time.monotonic() - t0,
                    "transport": mpi.TRANSPORT_ENV, "UCX_TLS": os.environ.get("UCX_TLS")}
        buf = np.array([rank + 1.0])
        comm.allreduce_(buf)
        return {"ok": True, "sum": float(buf[0]), "seconds": time.monotonic() - t0,
                "transport": mpi.TRANSPORT_ENV, "UCX_TLS": os.environ.get("UCX_TLS")}


def main(argv: list[str]) -> None:
    address, timeout = argv[0], float(argv[1])
    env = json.loads(argv[2]) if len(argv) > 2 else {}
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    pg = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=60)
    cls = ray.remote(Peer)
    peers = [cls.options(num_cpus=1, runtime_env={"env_vars": env},
                         scheduling_strategy=PlacementGroupSchedulingStrategy(
                             placement_group=pg, placement_group_bundle_index=i)).remote()
             for i in range(2)]
    where = ray.get([p.where.remote() for p in peers], timeout=60)
    # Rank 0 (the acceptor) on the driver's node, in the host's namespaces: the bundles of
    # a spread group land in either order, and which side accepts decides whether shared
    # memory across the namespaces fails (it does with the acceptor on the host).
    if where[0]["node_id"] != ray.get_runtime_context().get_node_id():
        peers.reverse()
        where.reverse()
    for i, p in enumerate(peers):
        where[i]["sees_peer_pid"] = ray.get(p.sees_pid.remote(where[1 - i]["pid"]), timeout=60)
    ports = ray.get([p.open_ports.remote(i, 2) for i, p in enumerate(peers)], timeout=60)
    t0 = time.monotonic()
    outs = ray.get([p.join.remote(ports, i, 2, timeout) for i, p in enumerate(peers)],
                   timeout=timeout + 30)
    wall = time.monotonic() - t0
    for p in peers:  # a failed rendezvous can leave MPI unusable: never reuse these
        ray.kill(p, no_restart=True)
    for i, (w, o) in enumerate(zip(where, outs, strict=True)):
        print(json.dumps({"rank": i, **w, **o, "wall": wall}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
