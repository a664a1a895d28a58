"""Elastic group sizes: the sizing rule on a scripted capacity, and the coordinator resizing."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.config import TrainConfig
from distbackprop.runtime.coordinator import Commit, Coordinator, TrainingFailed
from distbackprop.runtime.elastic import CapacityTimeout, ElasticSize
from distbackprop.runtime.placement import Replicated

from .test_coordinator import FakeGroup, Recorder


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _sizer(capacity, lo=1, hi=3, wait=10.0):
    clock = Clock()
    return ElasticSize(lo, hi, capacity, wait, check_every=5.0, settle_seconds=2.0,
                       clock=clock, sleep=clock.sleep), clock


def test_starts_with_what_fits_between_min_and_max():
    s, _ = _sizer(lambda: 5)
    assert s.size() == 3  # capped at MAX at once
    s, clock = _sizer(lambda: 2)
    assert s.size() == 2 and clock.t >= 2.0  # below MAX: settles briefly, never 60 s


def test_waits_for_min_then_gives_up_naming_it():
    s, clock = _sizer(lambda: 1, lo=2, wait=10.0)
    with pytest.raises(CapacityTimeout, match="needs at least 2"):
        s.size()
    assert 10.0 <= clock.t < 11.0


def test_capacity_returning_within_the_wait_is_used():
    seen = iter([0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    s, _ = _sizer(lambda: next(seen), lo=2, hi=2)
    assert s.size() == 2


def test_grow_checks_are_rate_limited():
    free = [2]
    s, clock = _sizer(lambda: free[0])
    assert s.size() == 2
    free[0] = 1
    assert s.grow_to(2) is None  # checked too recently
    clock.t += 5.0
    assert s.grow_to(2) == 3
    assert s.grow_to(3) is None  # at MAX


def test_coordinator_shrinks_after_a_loss_and_grows_back():
    capacity = iter([2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1] + [1] * 200)
    clock = Clock()
    sizer = ElasticSize(1, 2, lambda: next(capacity), 10.0, check_every=0.0,
                        settle_seconds=2.0, clock=clock, sleep=clock.sleep)
    log: list = []
    ref: list = []
    rec = Recorder(ref)
    script = {"die_at": {9}}
    c = Coordinator(TrainConfig(chunk_steps=4, workers="1:2", commit_seconds=0),
                    lambda size: FakeGroup(script, size, log), Replicated(), 24,
                    Commit(0, {"params": np.zeros(1)}), rec, sizer=sizer)
    ref.append(c)
    final = c.run()
    assert final.step == 24 and final.resolved()["params"][0] == 24  # nothing lost or doubled
    sizes = [w for _, _, w in rec.chunks]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2  # 2 → 1 → 2
    assert ("resize", rec.restarts[-1][1]) == rec.restarts[-1]


def test_below_min_for_too_long_fails_naming_the_commit():
    clock = Clock()
    capacity = iter([2] + [0] * 10_000)
    sizer = ElasticSize(2, 2, lambda: next(capacity), 5.0, clock=clock, sleep=clock.sleep)
    ref: list = []
    rec = Recorder(ref)
    c = Coordinator(TrainConfig(chunk_steps=4, workers="2:2", commit_seconds=0),
                    lambda size: FakeGroup({"die_at": {9}}, size, []), Replicated(), 24,
                    Commit(0, {"params": np.zeros(1)}), rec, sizer=sizer)
    ref.append(c)
    with pytest.raises(TrainingFailed, match="last commit is at step 8"):
        c.run()
