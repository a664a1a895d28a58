"""The rendezvous' schedule: which groups merge in which round, on whose port (no MPI here).

A rendezvous of `size` ranks starts from `size` groups of one rank and ends in one group;
each step merges two groups of consecutive ranks, ``[lo, mid)`` (the lower, which accepts
on a port opened by its leader ``lo``) and ``[mid, hi)`` (the upper, which connects), so
that ranks stay equal to actor indices. Two schedules:

- ``"doubling"`` (recursive doubling, the default): in round r = 0..⌈log₂ size⌉−1 every
  group ``[a, a+2^r)`` with `a` a multiple of 2^(r+1) merges with ``[a+2^r,
  min(a+2^(r+1), size))`` when that one is non-empty. The merges of a round are
  independent, so the group forms in ⌈log₂ size⌉ rounds; rank `a` opens one port per
  round it leads (rank 0 one per round, odd ranks none).
- ``"sequential"``: ``[0, k)`` accepts rank k, for k = 1..size−1: size−1 rounds, every
  port opened by rank 0. Kept as the reference `bench rendezvous` measures against.

`distbackprop.comm.mpi` carries the merges out; this module is importable without MPI
(the benchmark's driver and the tests use it to count rounds).
"""

from __future__ import annotations

from typing import NamedTuple

SCHEDULES: tuple[str, ...] = ("doubling", "sequential")


class Merge(NamedTuple):
    """One step: group [lo, mid) accepts group [mid, hi) on port `port` of rank `lo`
    (the index into the lines of rank lo's port string), in round `round`."""

    round: int
    lo: int
    mid: int
    hi: int
    port: int


def merges(size: int, schedule: str = "doubling") -> list[Merge]:
    """Every merge of a rendezvous of `size` ranks, in round order."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if schedule == "sequential":
        return [Merge(k - 1, 0, k, k + 1, k - 1) for k in range(1, size)]
    if schedule != "doubling":
        raise ValueError(f"unknown rendezvous schedule {schedule!r}; choose one of "
                         f"{', '.join(SCHEDULES)}")
    out: list[Merge] = []
    r, half = 0, 1
    while half < size:
        # A leader of round r led every earlier round too (a multiple of 2^(r+1) is one of
        # 2^r, and a + 2^(r-1) < a + 2^r < size), so its port for round r is its r-th.
        out += [Merge(r, a, a + half, min(a + 2 * half, size), r)
                for a in range(0, size - half, 2 * half)]
        r, half = r + 1, 2 * half
    return out


def rounds(size: int, schedule: str = "doubling") -> int:
    """How many rounds the rendezvous takes: ⌈log₂ size⌉ doubling, size−1 sequential."""
    steps = merges(size, schedule)
    return steps[-1].round + 1 if steps else 0


def ports_led(rank: int, size: int, schedule: str = "doubling") -> int:
    """How many ports `rank` opens: one per merge it leads."""
    return sum(m.lo == rank for m in merges(size, schedule))


def plan(rank: int, size: int, schedule: str = "doubling") -> list[Merge]:
    """The merges `rank` takes part in, in order (it is in [lo, hi) of each)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for size {size}")
    return [m for m in merges(size, schedule) if m.lo <= rank < m.hi]


def span(lo: int, hi: int) -> str:
    """Ranks [lo, hi) for a message: "rank 4" or "ranks 4..7"."""
    return f"rank {lo}" if hi - lo == 1 else f"ranks {lo}..{hi - 1}"


__all__ = ["SCHEDULES", "Merge", "merges", "plan", "ports_led", "rounds", "span"]
