"""One rank of a 2-rank rendezvous through distbackprop.comm.mpi, for test_mpi_network.

    python -m tests.deploy.mpi_peer            # rank 0: prints the port string, then joins
    python -m tests.deploy.mpi_peer PORTFILE   # rank 1: joins the port string in PORTFILE

After an allreduce over the group, prints one JSON line: the sum and the
addresses of this process's listening TCP sockets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import psutil

from distbackprop.comm import mpi


def main(argv: list[str]) -> None:
    if argv:
        rank, port = 1, Path(argv[0]).read_text()
    else:
        rank, port = 0, mpi.open_port(2)
        print(json.dumps({"port": port}), flush=True)
    comm = mpi.join(port, rank, 2, timeout=60)
    buf = np.array([rank + 1.0])
    comm.allreduce_(buf)
    listening = sorted(f"{c.laddr.ip}:{c.laddr.port}"
                       for c in psutil.Process().net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN)
    comm.barrier()
    comm.close()
    print(json.dumps({"sum": float(buf[0]), "listening": listening}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
