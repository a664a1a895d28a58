"""Which MPI transports a rank may use, decided before MPI initialises (no mpi4py here).

The `mpich` wheel's ch4/UCX netmod picks shared-memory transports for peers it
believes are on the same machine. Between a process in the host's initial PID
namespace and one in a child PID namespace that still shares the host's IPC
namespace (a container run with ``--ipc=host``, a Kubernetes pod with
``hostIPC``), that choice fails: ``MPI_Comm_connect`` errors out at once
("Other MPI error" / "Invalid port" from ``MPIDI_UCX_upids_to_gpids``) and the
group never forms. UCX's debug log says why: its System V shared-memory endpoint
reads the peer's ``/proc/<pid>/stat``, and the host rank's PID is not in the child's
namespace. Measured here with UCX 1.18.1 (mpich 4.3.2): host rank ↔ child-namespace
rank fails; two ranks in two different child PID namespaces, or in private IPC
namespaces, form the group; restricting *only the child-namespace rank* to
``UCX_TLS=tcp,self`` is enough, since the wire-up uses the transports both sides offer.

So the decision can be made by each rank alone, from its own namespaces
(`transport_env()`), which `distbackprop.comm.mpi` applies at import, before
MPI_Init. When the coordinator knows every rank's `process_identity()`, it can
also pass them as ``peers`` to cover namespaces nested below a container (see
`transport_env`). An explicit ``UCX_TLS`` in the environment always wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

# Inode numbers of the kernel's initial namespaces (include/linux/proc_ns.h,
# PROC_*_INIT_INO; fixed since Linux 3.8): how a process tells whether it is in
# the host's own PID / IPC namespace without seeing any other process.
PROC_IPC_INIT_INO = 0xEFFFFFFF
PROC_PID_INIT_INO = 0xEFFFFFFC

TCP_ONLY = {"UCX_TLS": "tcp,self"}

FIX_HINT = ("if the ranks share a machine from different PID namespaces (containers) with "
            "one IPC namespace (--ipc=host), shared memory cannot reach across them: set "
            "UCX_TLS=tcp,self in the workers' environment")


def _ns_inode(kind: str, pid: str = "self") -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/{kind}")  # e.g. "pid:[4026531836]"
    except OSError:
        return None
    return int(link[link.index("[") + 1:-1])


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def process_identity() -> dict[str, str | int | None]:
    """What decides shared-memory reachability for this process: the machine (boot id)
    and its PID and IPC namespace inodes. Plain values, so it travels through Ray."""
    return {"boot_id": _boot_id(), "pid_ns": _ns_inode("pid"), "ipc_ns": _ns_inode("ipc")}


def transport_env(peers: Sequence[Mapping] | None = None, *,
                  me: Mapping | None = None,
                  environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables this rank needs before MPI_Init; ``{}`` when the defaults work.

    - ``UCX_TLS`` already set (by the user, a runtime env, the deploy docs): ``{}``, the
      explicit choice stands.
    - This process (`me`, default: `process_identity()`) is in a child PID namespace but
      the host's initial IPC namespace: ``UCX_TLS=tcp,self`` (see the module docstring).
    - `peers` (every rank's `process_identity()`, this one included or not): any peer on
      the same machine and IPC namespace as `me` but in another PID namespace →
      ``UCX_TLS=tcp,self``. This covers namespaces nested inside a container, where the
      shared IPC namespace is not the host's initial one.
    """
    env = os.environ if environ is None else environ
    if env.get("UCX_TLS"):
        return {}
    me = process_identity() if me is None else me
    if me.get("pid_ns") is None or me.get("ipc_ns") is None:
        return {}  # no /proc: nothing to decide from
    if me["pid_ns"] != PROC_PID_INIT_INO and me["ipc_ns"] == PROC_IPC_INIT_INO:
        return dict(TCP_ONLY)
    for p in peers or ():
        if (p.get("boot_id") == me.get("boot_id") and p.get("ipc_ns") == me["ipc_ns"]
                and p.get("pid_ns") is not None and p["pid_ns"] != me["pid_ns"]):
            return dict(TCP_ONLY)
    return {}


def apply_transport_env(env: Mapping[str, str]) -> None:
    """Put `env` (from `transport_env`) into this process's environment; call it before the
    first import of `distbackprop.comm.mpi`. Raises RuntimeError if MPI is already
    initialised with a different setting (UCX reads it once, at MPI_Init: the process
    would have to be restarted)."""
    import sys
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        differ = {k: v for k, v in env.items() if os.environ.get(k) != v}
        if differ:
            raise RuntimeError(f"MPI is already initialised; {differ} would take effect only "
                               f"in a new process")
        return
    os.environ.update(env)


__all__ = ["FIX_HINT", "TCP_ONLY", "apply_transport_env", "process_identity", "transport_env"]
