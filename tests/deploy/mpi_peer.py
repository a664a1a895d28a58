"""One rank of a 2-rank rendezvous through distbackprop.comm.mpi, for test_mpi_network.

    python -m tests.deploy.mpi_peer            # rank 0: prints its port string, then joins
    python -m tests.deploy.mpi_peer PORTFILE   # rank 1: joins with rank 0's string in PORTFILE

Rank 1 leads no merge of a 2-rank rendezvous, so its own port string is "" (and rank 0
need not be told it).

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
        rank, ports = 1, [Path(argv[0]).read_text(), mpi.open_ports(1, 2)]
    else:
        ports = [mpi.open_ports(0, 2), ""]
        rank = 0
        print(json.dumps({"port": ports[0]}), flush=True)
    comm = mpi.join(ports, rank, 2, timeout=60)
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
