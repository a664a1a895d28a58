"""The rendezvous schedules, without MPI: which groups merge in which round, on whose port."""

from __future__ import annotations

import math

import pytest

from distbackprop.comm.rendezvous import SCHEDULES, merges, plan, ports_led, rounds, span


def _simulate(size: int, schedule: str) -> list[list[range]]:
    """Replay the merges round by round; the groups after each round (ranges of ranks)."""
    groups = {r: range(r, r + 1) for r in range(size)}  # keyed by leader
    history = []
    by_round: dict[int, list] = {}
    for m in merges(size, schedule):
        by_round.setdefault(m.round, []).append(m)
    for r in sorted(by_round):
        for m in by_round[r]:
            # Both sides exist as whole groups when their round starts: consecutive ranks.
            assert groups.get(m.lo) == range(m.lo, m.mid), (schedule, size, m)
            assert groups.get(m.mid) == range(m.mid, m.hi), (schedule, size, m)
            del groups[m.mid]
            groups[m.lo] = range(m.lo, m.hi)
        history.append(sorted(groups.values(), key=lambda g: g.start))
    return history


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("size", range(1, 34))
def test_every_schedule_ends_in_one_group_of_all_ranks(size, schedule):
    history = _simulate(size, schedule)
    assert (history[-1] if history else [range(size)]) == [range(size)]
    assert len(history) == rounds(size, schedule)


@pytest.mark.parametrize("size", range(1, 34))
def test_doubling_takes_ceil_log2_rounds_and_sequential_size_minus_one(size):
    assert rounds(size, "doubling") == math.ceil(math.log2(size))
    assert rounds(size, "sequential") == size - 1
    # In a doubling round every rank takes part in one merge at most.
    for r in range(rounds(size)):
        members = [i for m in merges(size) if m.round == r for i in range(m.lo, m.hi)]
        assert len(members) == len(set(members))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("size", [2, 5, 8, 13])
def test_each_leader_uses_its_own_ports_in_order(size, schedule):
    for lo in range(size):
        led = [m for m in merges(size, schedule) if m.lo == lo]
        assert [m.port for m in led] == list(range(ports_led(lo, size, schedule)))
    assert sum(ports_led(r, size, schedule) for r in range(size)) == size - 1
    if schedule == "sequential":
        assert ports_led(0, size, schedule) == size - 1
    else:
        assert ports_led(0, size) == rounds(size) and ports_led(1, size) == 0
    for rank in range(size):
        assert all(m.lo <= rank < m.hi for m in plan(rank, size, schedule))


def test_the_eight_rank_doubling_plan_and_its_names():
    assert [(m.round, m.lo, m.mid, m.hi) for m in merges(8)] == [
        (0, 0, 1, 2), (0, 2, 3, 4), (0, 4, 5, 6), (0, 6, 7, 8),
        (1, 0, 2, 4), (1, 4, 6, 8),
        (2, 0, 4, 8)]
    assert [(m.lo, m.mid, m.hi) for m in plan(5, 8)] == [(4, 5, 6), (4, 6, 8), (0, 4, 8)]
    assert (span(5, 6), span(4, 8)) == ("rank 5", "ranks 4..7")
    with pytest.raises(ValueError, match="unknown rendezvous schedule 'ring'"):
        merges(4, "ring")
