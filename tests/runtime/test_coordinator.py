"""The `Coordinator` state machine, driven by an in-process fake group (no Ray, no model).

The fake's "training" adds 1 to a one-element state per step, so the commit
after N steps is exactly N, whatever the failures on the way.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from distbackprop.config import TrainConfig
from distbackprop.metrics.health import StepStats
from distbackprop.runtime.coordinator import Commit, Coordinator, State, TrainingFailed
from distbackprop.runtime.group import WorkerFailure
from distbackprop.runtime.placement import Replicated

LAYERS = ["dense0"]


class FakeGroup:
    """A `WorkerGroup` whose replicas count steps; told to die, hang or diverge at a step.

    With `pipelines` (as Ray workers), a chunk computes when it is submitted — queued
    behind the one the coordinator has not collected yet — and its outcome (results or
    failure) is delivered when it is collected."""

    interrupt = None
    pipelines = False

    def __init__(self, script: dict, size: int, log: list):
        self.script, self.size, self.log = script, size, log
        self.value = None
        self.consecutive = 0

    def submit_chunk(self, start, k, consecutive, want_state=True):
        self.in_flight = getattr(self, "in_flight", 0) + 1
        self.log.append(("in flight", self.in_flight))
        if not self.pipelines:
            return start, k, consecutive, want_state
        try:
            return "done", self.run_chunk(start, k, consecutive, 0.0, want_state)
        except WorkerFailure as exc:
            return "failed", exc

    def collect_chunk(self, pending, deadline):
        self.in_flight -= 1
        if not self.pipelines:
            return self.run_chunk(*pending[:3], deadline, pending[3])
        if pending[0] == "failed":
            raise pending[1]
        return pending[1]

    def start(self) -> None:
        self.log.append(("start", self.size))
        if self.script.pop("fail_start", False):
            raise WorkerFailure("rank 1 never joined", [1], "hang")

    def load_state(self, state) -> None:
        self.value = state["params"].copy()

    def run_chunk(self, start: int, k: int, consecutive: int, deadline: float,
                  want_state: bool = True):
        if self.value is None:
            self.value = np.zeros(1)
        if consecutive is None:
            consecutive = self.consecutive
        stats = StepStats(max(k, 1), LAYERS)
        for step in range(start, start + k):
            for kind, reason in (("die_at", "death"), ("hang_at", "hang")):
                if step in self.script.get(kind, set()):
                    self.script[kind].discard(step)
                    raise WorkerFailure(f"rank 0 {reason} at step {step}", [0], reason)
            skipped = step in self.script.get("nan_at", ())
            if not skipped:
                self.value += 1
            consecutive = consecutive + 1 if skipped else 0
            stats.record(step=step, epoch=0, loss=float(step), samples=4, lr=0.1,
                         health={"grad_global_norm": 1.0, "grad_norm": [1.0],
                                 "grad_max_abs": 1.0, "nonfinite": int(skipped)},
                         update_ratio=None, skipped=skipped, step_seconds=1e-4,
                         phase_seconds=[0, 0, 0, 0, 0])
            if consecutive >= 3:
                break
        self.consecutive = consecutive
        crcs = [(1.0, 1.0)] * self.size
        if any(s < start + k for s in self.script.get("diverge_at", ())):  # and stays so
            crcs[-1] = (2.0, 1.0)
        results = [{"rank": r, "stats": stats.as_dict(), "memory": {},
                    "consecutive_skips": consecutive} for r in range(self.size)]
        if want_state:  # as Ray workers do: checksums travel with the state
            for r, row in enumerate(results):
                row["checksum"] = crcs[r]
        self.log.append(("chunk", start, k, want_state))
        return results, ({"params": self.value.copy()} if want_state else None)

    def grad_step(self, *a):  # pragma: no cover - replicated placement only
        raise AssertionError

    def shutdown(self, graceful: bool = False) -> None:
        self.log.append(("shutdown", graceful))


@pytest.fixture(autouse=True, params=[False, True], ids=["one-at-a-time", "pipelined"])
def pipelined(request, monkeypatch) -> bool:
    """Every test runs with chunks collected one at a time and with the next one queued."""
    monkeypatch.setattr(FakeGroup, "pipelines", request.param)
    return request.param


class Recorder:
    def __init__(self, coordinator_ref: list):
        self.ref, self.states, self.chunks, self.restarts = coordinator_ref, [], [], []

    def on_chunk(self, stats, memory, workers):
        self.chunks.append((int(stats["step"][0]), len(stats["step"]), workers))
        self.states.append(self.ref[0].state)

    def on_commit(self, commit):
        pass

    def on_restart(self, why, reason, resume_step):
        self.restarts.append((reason, resume_step))
        self.states.append(self.ref[0].state)

    def on_rewind(self, step):
        self.rewinds = getattr(self, "rewinds", []) + [step]


def _run(script: dict, total: int = 20, stop=None, **cfg):
    log: list = []
    ref: list = []
    rec = Recorder(ref)
    cfg.setdefault("commit_seconds", 0)  # a commit every chunk, unless a test says otherwise
    config = TrainConfig(chunk_steps=4, max_failures=cfg.pop("max_failures", 3), **cfg)
    c = Coordinator(config, lambda size: FakeGroup(script, size, log), Replicated(), total,
                    Commit(0, {"params": np.zeros(1)}), rec, stop=stop)
    ref.append(c)
    return c, rec, log


def test_finishes_in_chunks(pipelined):
    c, rec, log = _run({})
    final = c.run()
    assert c.state is State.FINISHED
    assert final.step == 20 and final.resolved()["params"][0] == 20
    assert [s for s, _, _ in rec.chunks] == [0, 4, 8, 12, 16]
    assert all(s is State.RUNNING for s in rec.states)
    assert [e for e in log if e[0] not in ("chunk", "in flight")] == [("start", 2),
                                                                      ("shutdown", True)]
    # after the first chunk (which measures the step time) the next one is always queued
    assert max(n for e, n in (x[:2] for x in log) if e == "in flight") == (2 if pipelined else 1)


@pytest.mark.parametrize("kind,reason", [("die_at", "death"), ("hang_at", "hang")])
def test_a_failure_recovers_from_the_last_commit(kind, reason):
    c, rec, log = _run({kind: {9}})
    final = c.run()
    assert c.state is State.FINISHED
    assert final.step == 20 and final.resolved()["params"][0] == 20  # no step lost or doubled
    assert rec.restarts == [(reason, 8)]
    assert rec.states[rec.states.index(State.RECOVERING) + 1] is State.RUNNING
    assert c.stats.restarts == 1 and c.stats.failures[0]["reason"] == reason
    assert log.count(("shutdown", False)) == 1  # the failed group was killed


def test_a_failure_records_when_it_was_noticed_and_when_the_new_group_stepped():
    c, _, _ = _run({"die_at": {9}})
    t0 = time.time()
    c.run()
    (f,) = c.stats.failures
    assert t0 <= f["noticed_at"] <= f["detected_at"] <= f["resumed_at"] <= time.time()
    assert f["verdict_seconds"] == 0.0  # no vanished node to wait for
    assert f["step_at_failure"] == 8 and f["resume_step"] == 8  # a commit every chunk
    assert 0 <= f["reformed_seconds"] <= f["resumed_at"] - f["noticed_at"] + 1e-3


def test_a_group_that_fails_again_before_stepping_leaves_resumed_at_unset():
    c, _, _ = _run({"die_at": {9}})
    c.group_factory = _failing_once_then(c.group_factory)
    c.run()
    first, second = c.stats.failures
    assert first["resumed_at"] is None and first["reformed_seconds"] is None
    assert second["resumed_at"] is not None and second["reason"] == "hang"


def _failing_once_then(factory):
    """The first group formed after the initial one fails to start (a hang)."""
    made = []

    def build(size):
        g = factory(size)
        made.append(g)
        if len(made) == 2:
            g.script["fail_start"] = True
        return g
    return build


def test_a_group_that_never_forms_counts_as_a_failure():
    c, rec, _ = _run({"fail_start": True})
    assert c.run().step == 20
    assert rec.restarts == [("hang", 0)]


def test_too_many_failures_fail_the_run():
    c, _, _ = _run({"die_at": {5, 6, 7}}, max_failures=2)
    with pytest.raises(TrainingFailed, match="giving up after 3 failure"):
        c.run()
    assert c.state is State.FAILED


def test_diverged_replicas_fail_the_run():
    c, _, _ = _run({"diverge_at": {7}})
    with pytest.raises(TrainingFailed, match="replicas diverged"):
        c.run()
    assert c.state is State.FAILED


def test_replicas_are_checked_before_any_commit_holds_them():
    # state (and so checksums) only with the last chunk: the divergence at step 7 is found
    # there, and the newest commit is still the one from before it
    c, _, log = _run({"diverge_at": {7}}, commit_seconds=3600)
    with pytest.raises(TrainingFailed, match="replicas diverged"):
        c.run()
    assert c.commit.step == 0
    assert [x[1] for x in log if x[0] == "chunk"][-1] == 16  # found by the final chunk


def test_a_stop_request_ends_at_a_chunk_boundary(pipelined):
    t = []
    c, rec, _ = _run({}, stop=lambda: t[0] if t else None)
    rec.on_commit = lambda commit: t.append(time.monotonic()) if commit.step == 8 else None
    final = c.run()
    assert c.state is State.STOPPED
    end = 12 if pipelined else 8  # the chunk already queued is drained, not thrown away
    assert final.step == end and final.resolved()["params"][0] == end


def test_consecutive_skips_count_across_chunks_and_fail_the_run():
    # steps 7, 8, 9 are skipped: the count crosses the chunk boundary at 8
    c, _, _ = _run({"nan_at": {7, 8, 9}})
    with pytest.raises(TrainingFailed, match="3 consecutive steps skipped"):
        c.run()
    assert c.commit.step == 10 and c.commit.consecutive_skips == 3


def test_the_skip_count_survives_a_restart():
    # 7 skipped, then a death at 8 rewinds to the commit at 8 (count 1); 8 and 9 skipped → 3
    c, _, _ = _run({"nan_at": {7, 8, 9}, "die_at": {8}})
    with pytest.raises(TrainingFailed, match="3 consecutive"):
        c.run()


def test_abort_on_the_first_nonfinite_step():
    c, _, _ = _run({"nan_at": {5}}, on_nonfinite="abort")
    with pytest.raises(TrainingFailed, match="non-finite gradient at step 5"):
        c.run()


def test_sparse_commits_rewind_to_the_last_one_and_the_history_with_it():
    # the state travels only with the first chunk after start-up (--commit-seconds is long)
    # and the last one; a death at step 9 rewinds to step 0, replays, and loses nothing
    c, rec, log = _run({"die_at": {9}}, commit_seconds=3600)
    final = c.run()
    assert final.step == 20 and final.resolved()["params"][0] == 20
    shipped = [(start + k) for e, start, k, want in (x for x in log if x[0] == "chunk") if want]
    assert shipped == [20]  # only the final chunk carried the state
    assert rec.restarts == [("death", 0)] and rec.rewinds == [0]


def test_a_stop_between_sparse_commits_commits_the_current_step(pipelined):
    t = []
    c, rec, log = _run({}, stop=lambda: t[0] if t else None, commit_seconds=3600)
    orig = rec.on_chunk

    def on_chunk(stats, memory, workers):
        orig(stats, memory, workers)
        if int(stats["step"][-1]) == 11:
            t.append(time.monotonic())
    rec.on_chunk = on_chunk
    final = c.run()
    assert c.state is State.STOPPED
    end = 16 if pipelined else 12
    assert final.step == end and final.resolved()["params"][0] == end
    assert ("chunk", end, 0, True) in log  # a 0-step chunk fetched the state at the end


def test_a_stop_asks_the_group_to_end_its_chunk_mid_way_only_where_workers_loop(pipelined):
    """Ray workers that run the step loop (a pipelined placement) are asked, once, to end
    the running chunk within a step; a group driven step by step from here (the update on
    the coordinator) never is — its workers would fail their next gradient."""
    t: list = []
    c, _, _ = _run({}, stop=lambda: t[0] if t else None)
    c._start_group()
    asked: list = []
    c.group.request_stop = lambda: asked.append(1)
    assert c._while_waiting() is False and asked == []  # no stop yet
    t.append(time.monotonic())
    assert c._while_waiting() is False  # within the grace period
    c._while_waiting()
    assert asked == ([1] if pipelined else [])
    t[0] -= c.stop_grace + 1
    assert c._while_waiting() is True  # past the grace: abandon the chunk in flight
