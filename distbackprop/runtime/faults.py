"""Test-only fault injection, kept out of the step loop.

`DISTBACKPROP_TEST_FAULTS` (JSON) maps each fault kind to {global step: [ranks]}.
When it is set, groups build a `FaultyWorker` instead of a `Worker`: the
subclass fires the faults between backward and the allreduce. Production
workers carry no test branch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from .worker import Worker

ENV = "DISTBACKPROP_TEST_FAULTS"


@dataclass
class Faults:
    """Each kind maps a global step to the ranks it hits.

    With ``dir`` set, a fault fires once: a marker file records it, so the replay
    after a recovery runs clean. ``pause_at`` writes ``<dir>/pause-<step>-<rank>.pid``
    and sleeps, so a test can SIGKILL the worker by PID at a known step. ``hold_at``
    waits (after the ``hold_at-<step>-<rank>`` marker) until ``<dir>/release`` exists, so
    a test keeps a run going exactly as long as it needs.
    """

    nan_at: dict[int, list[int]] = field(default_factory=dict)
    hang_at: dict[int, list[int]] = field(default_factory=dict)
    exit_at: dict[int, list[int]] = field(default_factory=dict)
    pause_at: dict[int, list[int]] = field(default_factory=dict)
    perturb_at: dict[int, list[int]] = field(default_factory=dict)  # nudge one replica
    hold_at: dict[int, list[int]] = field(default_factory=dict)  # until <dir>/release
    dir: str | None = None
    slow_ms: float = 0.0  # every step of every rank takes at least this long (a long run)

    KINDS = ("nan_at", "hang_at", "exit_at", "pause_at", "perturb_at", "hold_at")

    @classmethod
    def parse(cls, raw: str) -> Faults:
        d = json.loads(raw)
        conv = {k: {int(s): list(r) for s, r in d.get(k, {}).items()} for k in cls.KINDS}
        return cls(**conv, dir=d.get("dir"), slow_ms=float(d.get("slow_ms", 0.0)))

    def hits(self, kind: str, step: int, rank: int) -> bool:
        if rank not in getattr(self, kind).get(step, ()):
            return False
        if self.dir is None:
            return True
        marker = os.path.join(self.dir, f"{kind}-{step}-{rank}")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def fire(self, step: int, worker: Worker) -> None:
        rank = worker.rank
        if self.slow_ms:
            time.sleep(self.slow_ms / 1000)
        if self.hits("nan_at", step, rank):
            worker.model.grads[0] = float("nan")
        if self.hits("perturb_at", step, rank):
            worker.model.params[0] += 1e-3
        if self.hits("hang_at", step, rank):
            time.sleep(3600)
        if self.hits("exit_at", step, rank):
            os._exit(137)
        if self.hits("hold_at", step, rank):
            release = os.path.join(self.dir or ".", "release")
            while not os.path.exists(release):
                time.sleep(0.05)
        if self.hits("pause_at", step, rank):
            path = os.path.join(self.dir or ".", f"pause-{step}-{rank}.pid")
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(120)


class FaultyWorker(Worker):
    """A `Worker` that fires `faults` after each local backward pass."""

    def __init__(self, *args, faults: Faults, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = faults

    def local_gradient_(self, step: int) -> tuple[float, int]:
        out = super().local_gradient_(step)
        self.faults.fire(step, self)
        return out


def worker_class(raw: str | None = None) -> tuple[type[Worker], dict]:
    """(class, extra kwargs) to build a replica with: `FaultyWorker` only when faults are set."""
    raw = raw if raw is not None else os.environ.get(ENV)
    if not raw:
        return Worker, {}
    return FaultyWorker, {"faults": Faults.parse(raw)}


__all__ = ["ENV", "Faults", "FaultyWorker", "worker_class"]
