"""A Ray worker group's calls: run in submission order on one thread, and a queued chunk
that a stop cancels runs no step on any rank; its workers' heaps are out of the cyclic
collector's reach, as is a `--local` run's while it trains."""

from __future__ import annotations

import gc
import json
import threading
import time

import numpy as np
import pytest

from distbackprop import TrainConfig, Trainer
from distbackprop.runtime.group import Turns


def test_turns_run_in_ticket_order_whatever_order_they_arrive():
    turns, ran, threads_seen = Turns(), [], set()

    def work(i):
        threads_seen.add(threading.get_ident())
        ran.append(i)
        if i == 2:
            raise ValueError("ticket 2 fails")
        return i * 10

    results: dict[int, object] = {}

    def call(i):
        try:
            results[i] = turns.run(i, work, i)
        except ValueError as exc:
            results[i] = exc

    callers = [threading.Thread(target=call, args=(i,)) for i in (3, 1, 4, 0, 2)]
    for t in callers:  # arrive out of order, a little apart
        t.start()
        time.sleep(0.01)
    for t in callers:
        t.join(10)
    assert ran == [0, 1, 2, 3, 4]
    assert [results[i] for i in (0, 1, 3, 4)] == [0, 10, 30, 40]
    assert isinstance(results[2], ValueError)  # raised on its caller's thread; later ones ran
    assert len(threads_seen) == 1 and threading.get_ident() not in threads_seen


@pytest.mark.ray
def test_a_stop_ends_the_running_chunk_within_a_step_and_the_queued_one_runs_none(
        ray_cluster, tmp_path):
    from distbackprop.runtime.group import GroupSpec, RayGroup

    cfg = TrainConfig(hidden=(32,), batch_size=64, seed=5, metrics_port=0, quiet=True,
                      workers=2, max_steps=80, out=str(tmp_path / "run"))
    prep = Trainer(cfg).prepare()

    def group() -> RayGroup:  # 100 ms per step: chunk A takes ~4 s
        g = RayGroup(GroupSpec(prep.spec, None, json.dumps({"slow_ms": 100})), 2)
        g.start()
        return g

    def params(g: RayGroup, step: int) -> np.ndarray:
        import ray
        results, state = g.collect_chunk(g.submit_chunk(step, 0, None, True), 120)
        assert [len(r["stats"]["step"]) for r in results] == [0, 0]
        return ray.get(state)["params"]

    g = group()
    try:
        a = g.submit_chunk(0, 40, 0, False)
        b = g.submit_chunk(40, 40, None, True)
        time.sleep(1.5)
        g.request_stop()
        ra, _ = g.collect_chunk(a, 120)
        n = len(ra[0]["stats"]["step"])
        assert 0 < n < 40, n  # cut short, at the same step on both ranks
        assert [list(r["stats"]["step"]) for r in ra] == [list(range(n))] * 2
        rb, _ = g.collect_chunk(b, 120)
        assert [len(r["stats"]["step"]) for r in rb] == [0, 0]
        stopped = params(g, n)
    finally:
        g.shutdown()
    g = group()
    try:  # the same n steps, never stopped
        g.collect_chunk(g.submit_chunk(0, n, 0, False), 120)
        np.testing.assert_array_equal(stopped, params(g, n))
    finally:
        g.shutdown()


def _prep(tmp_path, workers: int):
    cfg = TrainConfig(hidden=(32,), batch_size=64, seed=5, metrics_port=0, quiet=True,
                      workers=workers, max_steps=8, out=str(tmp_path / "run"))
    return Trainer(cfg).prepare()


def test_a_worker_actor_freezes_its_long_lived_heap(ray_cluster, tmp_path):
    """`heap.settle` in each actor: the long-lived heap (~10^5 objects) is frozen, so a
    full collection walks only what was made since, a chunk later too."""
    import ray

    from distbackprop.runtime.group import GroupSpec, RayGroup
    g = RayGroup(GroupSpec(_prep(tmp_path, 2).spec, None, None), 2)
    g.start()
    try:
        g.collect_chunk(g.submit_chunk(0, 8, 0, False), 120)
        heaps = ray.get([a.heap.remote() for a in g.actors], timeout=60)
    finally:
        g.shutdown()
    for h in heaps:
        assert h["frozen"] > 50_000, heaps
        assert h["tracked"] < h["frozen"] // 5, heaps


def test_a_local_group_freezes_the_heap_while_it_trains_and_gives_it_back(tmp_path):
    from distbackprop.runtime.group import GroupSpec, LocalGroup
    prep = _prep(tmp_path, 1)
    assert gc.get_freeze_count() == 0
    g = LocalGroup(GroupSpec(prep.spec, None, None), prep.bundle.x_train, prep.bundle.y_train)
    g.start()
    try:
        assert gc.get_freeze_count() > 50_000
        assert gc.is_tracked(g.worker) and not _collectable(g.worker)
        g.run_chunk(0, 8, 0, 60)
    finally:
        g.shutdown()
    assert gc.get_freeze_count() == 0


def _collectable(obj) -> bool:
    """Is `obj` in one of the collector's generations (not the frozen permanent one)?"""
    return any(o is obj for gen in range(3) for o in gc.get_objects(generation=gen))
