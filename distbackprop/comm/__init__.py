"""Communicators: a narrow protocol over NumPy buffers, and its backends.

`LocalComm` (one process), the helpers and the rendezvous' schedule
(`distbackprop.comm.rendezvous`) are importable without MPI; `MpiComm`, `open_ports` and
`join` live in `distbackprop.comm.mpi`, the package's only mpi4py importer, which
initialises MPI on import and so is imported only by the processes that form a group.
"""

from distbackprop.comm.base import (
    DEFAULT_BUCKET_BYTES,
    OPS,
    BucketedAllreduce,
    Communicator,
    CompletedRequest,
    RendezvousError,
    Request,
    checksum,
    flag_max,
    local_checksum,
    shard_bounds,
    shard_counts,
)
from distbackprop.comm.local import LocalComm

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "OPS",
    "BucketedAllreduce",
    "CompletedRequest",
    "Communicator",
    "LocalComm",
    "RendezvousError",
    "Request",
    "checksum",
    "flag_max",
    "local_checksum",
    "shard_bounds",
    "shard_counts",
]
