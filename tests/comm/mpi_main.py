"""Entry point for `mpiexec -n N python -m tests.comm.mpi_main`: the shared body on COMM_WORLD."""

from __future__ import annotations

import json

from distbackprop.comm.mpi import MpiComm
from tests.comm.body import run_comm_body


def main() -> None:
    comm = MpiComm.world()
    summary = run_comm_body(comm)
    comm.close()
    print("COMM-BODY-OK " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
