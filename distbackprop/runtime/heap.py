"""Keep CPython's cyclic garbage collector off a training process's long-lived heap.

A process that trains holds ~120–165 thousand long-lived objects (NumPy, pyarrow,
numba, Ray's modules, the model), and the collector's oldest generation walks all
of them each time it runs. Measured on the 2-core test machine: a full collection
of a worker's heap takes 143–210 ms, and one came about once per 300 reference
steps (~14 s); the step that met it took 139–239 ms instead of ~47, and with
several ranks every other rank waited for it at the next collective.

`settle()` is `gc.freeze()`: every object alive moves into the permanent
generation, which collections skip (a full collection then takes microseconds).
What the steps allocate afterwards is still collected as usual; frozen objects
are still freed by reference counting, and only a cycle among them would outlive
its use (a `Worker` and its model are freed by reference counting alone: no
cycles). No collection runs first: it found 0 unreachable objects in a freshly
built `--local` worker and 10 in a Ray actor, and cost 130–210 ms each time (at
every group start, in every test). `release()` gives the objects back to the
collector.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Freeze everything alive (`gc.freeze`): the collector skips it from now on."""
    gc.freeze()


def release() -> None:
    """Give the frozen objects back to the collector (`gc.unfreeze`), as the oldest
    generation: for a process that goes on after training (`--local`, tests)."""
    gc.unfreeze()


__all__ = ["release", "settle"]
