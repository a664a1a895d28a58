"""`--launcher mpi`: the same engine under ``mpiexec -n N python -m distbackprop train``.

No Ray: `MpiComm` wraps COMM_WORLD. Rank 0 runs the `Trainer` with an
`MpiRootGroup` injected as its group, which broadcasts each command to the
other ranks; they run `follow` until told to stop. Per-rank memory and
parameter checksums reach rank 0 through one SUM-allreduce of a (size, 6)
table in which each rank fills its own row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import TrainConfig
from .group import GroupSpec, RunsOnCollect
from .heap import settle
from .signals import StopRequest
from .trainer import Result, Trainer
from .worker import Worker

CMD_STOP, CMD_CHUNK, CMD_GRAD, CMD_LOAD = 0, 1, 2, 3


class MpiRootGroup(RunsOnCollect):
    """The `WorkerGroup` protocol on rank 0 of COMM_WORLD."""

    interrupt = None  # rank 0 computes too: its chunk ends within ~CHUNK_SECONDS

    def __init__(self, worker: Worker, comm):
        self.worker, self.comm = worker, comm
        self.size = comm.size
        self._cmd = np.zeros(5, np.int64)

    def _send(self, cmd: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> None:
        self._cmd[:] = (cmd, a, b, c, d)
        self.comm.bcast_(self._cmd, root=0)

    def start(self) -> None:
        pass

    def run_chunk(self, start: int, k: int, consecutive_skips: int | None, deadline: float,
                  want_state: bool = True) -> tuple[list[dict], dict | None]:
        self._send(CMD_CHUNK, start, k, -1 if consecutive_skips is None else consecutive_skips,
                   int(want_state))
        res = self.worker.run_chunk(start, k, consecutive_skips)
        state = self.worker.state() if want_state else None
        table = _gather_table(self.worker, self.comm, want_state)
        out = [res]
        for r in range(1, self.size):
            out.append({"rank": r, "memory": {"rss_bytes": int(table[r, 3]),
                                              "peak_rss_bytes": int(table[r, 2]),
                                              "activation_bytes": int(table[r, 4]),
                                              "shared_bytes": int(table[r, 5])}})
        if want_state:  # checksums travel with the state, as with Ray workers
            for r, row in enumerate(out):
                row["checksum"] = (table[r, 0], table[r, 1])
        return out, state

    def grad_step(self, step: int, params, deadline: float) -> dict[str, Any]:
        self._send(CMD_GRAD, step, int(params is not None))
        if params is not None:
            self.worker.set_params_(params)
            self.comm.bcast_(self.worker.model.params, root=0)
        return self.worker.reduced_gradient(step, None)

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._send(CMD_LOAD)
        _bcast_state(self.worker, self.comm, state)

    def shutdown(self, graceful: bool = False) -> None:
        pass  # the ranks outlive the group: `run_mpi` stops them

    def stop_followers(self) -> None:
        self._send(CMD_STOP)


def _gather_table(worker: Worker, comm, with_checksum: bool) -> np.ndarray:
    """(size, 6) float64: the parameter checksum's two parts (zeros unless
    `with_checksum`), peak RSS, RSS, activation bytes, shared bytes — one row per rank."""
    t = np.zeros((comm.size, 6))
    mem = worker.memory()
    t[comm.rank] = (*(worker.checksum() if with_checksum else (0.0, 0.0)),
                    mem["peak_rss_bytes"], mem["rss_bytes"], mem["activation_bytes"],
                    mem["shared_bytes"])
    comm.allreduce_(t)
    return t


def follow(worker: Worker, comm) -> None:
    """Non-root ranks: execute rank 0's broadcast commands until CMD_STOP."""
    cmd = np.zeros(5, np.int64)
    while True:
        comm.bcast_(cmd, root=0)
        op, a, b, c, d = (int(v) for v in cmd)
        if op == CMD_STOP:
            return
        if op == CMD_CHUNK:
            worker.run_chunk(a, b, None if c < 0 else c)
            if d:
                worker.commit_state()  # collective when the update is sharded
            _gather_table(worker, comm, bool(d))
        elif op == CMD_GRAD:
            if b:
                comm.bcast_(worker.model.params, root=0)
            worker.reduced_gradient(a, None)
        elif op == CMD_LOAD:
            _bcast_state(worker, comm, None)


def _bcast_state(worker: Worker, comm, state: dict[str, np.ndarray] | None) -> None:
    """Rank 0's whole `state` to every rank (others pass None), then each loads it."""
    template = worker.full_state_template()
    full = state if comm.rank == 0 else template
    for k in template:
        comm.bcast_(full[k], root=0)
    worker.load_state_(full)


def run_mpi(config: TrainConfig, started: float | None = None) -> Result | None:
    """Entry for every rank; returns the `Result` on rank 0 and None elsewhere."""
    from ..comm.mpi import MpiComm
    comm = MpiComm.world()
    try:
        cfg = config.replace(workers=comm.size, local=False)
        trainer = Trainer(cfg, started=started)
        prep = trainer.prepare()
        spec = GroupSpec(prep.spec, None, _faults())
        worker = spec.build_worker(comm.rank, comm.size, prep.bundle.x_train,
                                   prep.bundle.y_train, comm=comm)
        settle()  # this process lives to train: no full collections of its heap (`heap`)
        if comm.rank != 0:
            # Signals sent to every rank (mpiexec forwards them): rank 0 decides and stops
            # the followers at a chunk boundary, so a follower only notes them.
            stop = StopRequest()
            stop.install()
            try:
                follow(worker, comm)
            finally:
                stop.restore()
            return None
        group = MpiRootGroup(worker, comm)
        trainer.group_factory = lambda spec, size: group
        try:
            return trainer.fit(prep)
        finally:
            group.stop_followers()
    finally:
        comm.close()


def _faults() -> str | None:
    import os
    return os.environ.get("DISTBACKPROP_TEST_FAULTS")


__all__ = ["MpiRootGroup", "follow", "run_mpi"]
