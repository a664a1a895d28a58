"""How many workers a group starts with: fixed (`--workers N`) or elastic (`--workers MIN:MAX`).

An elastic run starts with as many workers as the cluster can place now,
between MIN and MAX, reading the cluster's free resources instead of waiting
out a placement timeout. After a lost worker or node it continues with what
fits (≥ MIN); while below MAX it checks, at most every few seconds, whether
capacity returned, and grows back. The global batch and the data order do not
depend on the group size (rank slices are recut), so a resize changes only the
order of float summation.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CapacityTimeout(RuntimeError):
    """Fewer than MIN workers could be placed within the wait."""


class FixedSize:
    """Always `n` workers."""

    def __init__(self, n: int):
        self.n = n

    def size(self) -> int:
        return self.n

    def grow_to(self, current: int) -> int | None:
        return None


class ElasticSize:
    """Between `lo` and `hi` workers, from `capacity()`: workers placeable on free resources."""

    def __init__(self, lo: int, hi: int, capacity: Callable[[], int], wait_seconds: float,
                 check_every: float = 5.0, settle_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.lo, self.hi = lo, hi
        self.capacity, self.wait_seconds = capacity, wait_seconds
        self.check_every, self.settle_seconds = check_every, settle_seconds
        self.clock, self.sleep = clock, sleep
        self._last_check = clock()

    def size(self) -> int:
        """Workers for a new group (no group of ours holds resources now).

        Resources of a group just removed come back within moments, so a short
        settle time is allowed before settling below `hi`; below `lo`, wait up to
        `wait_seconds` for capacity, then raise `CapacityTimeout`.
        """
        start = self.clock()
        best = 0
        while True:
            best = self.capacity()
            waited = self.clock() - start
            if best >= self.hi or (best >= self.lo and waited >= self.settle_seconds):
                self._last_check = self.clock()
                return min(best, self.hi)
            if waited >= max(self.wait_seconds, self.settle_seconds):
                raise CapacityTimeout(
                    f"only {best} worker(s) can be placed on the cluster's free resources; "
                    f"--workers {self.lo}:{self.hi} needs at least {self.lo} (waited "
                    f"{waited:.0f} s, --rendezvous-timeout)")
            self.sleep(0.25)

    def grow_to(self, current: int) -> int | None:
        """While below `hi`, at most every `check_every` s: the larger size that now fits."""
        if current >= self.hi or self.clock() - self._last_check < self.check_every:
            return None
        self._last_check = self.clock()
        free = self.capacity()  # beyond what the running group holds
        return min(self.hi, current + free) if free > 0 else None


__all__ = ["CapacityTimeout", "ElasticSize", "FixedSize"]
