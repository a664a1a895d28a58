"""`Coordinator`: owns the training state and the loop over chunks.

A small state machine, STARTING → RUNNING → RECOVERING → FINISHED | FAILED |
STOPPED, with its collaborators injected (a group factory, an update
placement, an observer for metrics/history/checkpoints, a stop request), so
it runs the same in one process, over Ray actors, under mpiexec, and in unit
tests with a fake group.

Each chunk the coordinator receives per-step statistics, lets the placement
verify the replicas, feeds the observer, and commits the state in memory (so a
worker failure rewinds at most one chunk). The commit is pulled to the
coordinator's own node in the background (`CommitKeeper`), so losing the node
that produced it loses at most the chunk in flight.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..config import TrainConfig
from .commitstore import SharedState
from .elastic import CapacityTimeout, FixedSize
from .group import ChunkAbandoned, WorkerFailure, WorkerGroup
from .placement import Placement, ReplicasDiverged, run_chunk
from .step import SkipPolicy

# The wall time a chunk aims at (its steps are chosen from the measured step time). What a
# chunk costs besides its steps (a few hundred µs on a Ray worker: the hand-over to the
# queued chunk, its statistics and memory sample, and Ray's handling of both on 2 busy
# cores) is spread over its steps. A stop does not wait for the chunk on Ray workers (it
# ends within a step, see `Worker.request_stop`); elsewhere it waits for at most one.
CHUNK_SECONDS = 2.0


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"  # a stop signal: the last commit is kept, the run can resume


class TrainingFailed(RuntimeError):
    """Training could not complete (exit status 1); the message says why and where to resume."""


@dataclass
class Commit:
    """The last consistent training state: after `step` steps.

    `state` is a dict of arrays, or — in the Ray runtime — a reference to that
    dict in Ray's object store, owned by the coordinator and fetched when needed, or a
    `SharedState` naming it in the shared-memory store (rank 0 on this machine).
    """

    step: int
    state: Any
    consecutive_skips: int = 0  # the non-finite policy's count after `step`

    def resolved(self) -> dict[str, np.ndarray]:
        """The state as arrays (copied once out of the shared-memory store, or fetched once
        from Ray's object store, if need be). Raises if that copy is gone."""
        if not isinstance(self.state, (dict, SharedState)):
            import ray
            self.state = ray.get(self.state)
        if isinstance(self.state, SharedState):
            self.state = self.state.read()
        return self.state


class CommitKeeper:
    """Keeps the newest commit safe on the coordinator's node.

    A commit produced by a worker lives first in that worker's node; a thread
    pulls it here while the next chunk computes. `safe()` is the newest commit
    that has landed (the previous one is kept until then), so losing the
    producing node costs at most the chunk in flight.
    """

    def __init__(self, commit: Commit):
        self._safe = commit
        self._newest = commit
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def newest(self) -> Commit:
        return self._newest

    def offer(self, commit: Commit, local: bool = False) -> None:
        """Keep `commit` as the newest; `local`: it already lives on this node (in this
        node's object store), so it is safe without a pull."""
        self._newest = commit
        if isinstance(commit.state, dict) or local:
            self._join()
            with self._lock:
                self._safe = commit
            return
        self._join()  # one pull in flight at a time: the previous one has landed or failed
        self._thread = threading.Thread(target=self._pull, args=(commit,), daemon=True,
                                        name="commit-pull")
        self._thread.start()

    def _pull(self, commit: Commit) -> None:
        try:
            arrays = commit.resolved()
        except Exception:  # noqa: BLE001 - its node is gone: keep the previous safe commit
            return
        with self._lock:
            if commit.step >= self._safe.step:
                self._safe = Commit(commit.step, arrays, commit.consecutive_skips)

    def _join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def safe(self, timeout: float = 60.0) -> Commit:
        """The newest commit held on this node (waits up to `timeout` for a pull in flight)."""
        self._join(timeout)
        with self._lock:
            return self._safe


class Observer(Protocol):
    """What the coordinator reports; the trainer's `RunObserver` implements it."""

    def on_chunk(self, stats: dict[str, np.ndarray], memory: dict[int, dict],
                 workers: int) -> None: ...
    def on_commit(self, commit: Commit) -> None: ...
    def on_restart(self, why: str, reason: str, resume_step: int) -> None: ...
    def on_rewind(self, step: int) -> None: ...


class NullObserver:
    def on_chunk(self, stats, memory, workers) -> None:
        pass

    def on_commit(self, commit) -> None:
        pass

    def on_restart(self, why, reason, resume_step) -> None:
        pass

    def on_rewind(self, step) -> None:
        pass


@dataclass
class RunStats:
    first_step_start: float | None = None
    last_step_end: float | None = None
    samples: int = 0
    restarts: int = 0
    skipped: int = 0
    recovery_seconds: list[float] = field(default_factory=list)
    # when noticed/detected, why, which ranks, when the next group stepped (see _recover)
    failures: list[dict] = field(default_factory=list)
    # per chunk: (steps, wall seconds from dispatch to results, Σ step_seconds, whether it
    # shipped the state: a commit)
    chunks: list[tuple[int, float, float, bool]] = field(default_factory=list)

    def coordination_seconds_per_step(self) -> float | None:
        """Σ(wall − Σ step time) / Σ steps over the chunks after the first (a warm-up): what
        dispatch, bookkeeping, checksums and state commits add to each step, on average.
        A chunk's wall runs from when it could start (its submission, or the previous
        chunk's results if it was queued behind them) to when its results arrived."""
        rest = [c for c in self.chunks[1:] if c[0]]
        steps = sum(c[0] for c in rest)
        return sum(c[1] - c[2] for c in rest) / steps if steps else None

    def coordination(self) -> dict[str, float | int | None]:
        """What coordination is made of, over the chunks after the first: µs per step (as
        above), the median ms a chunk adds without and with a commit, steps per chunk."""
        rest = [c for c in self.chunks[1:] if c[0]]

        def ms(xs: list[float]) -> float | None:
            return float(np.median(xs)) * 1e3 if xs else None

        per_step = self.coordination_seconds_per_step()
        return {"us_per_step": None if per_step is None else per_step * 1e6,
                "chunks": len(rest), "commits": sum(c[3] for c in rest),
                "steps_per_chunk": float(np.median([c[0] for c in rest])) if rest else None,
                "chunk_ms": ms([c[1] - c[2] for c in rest if not c[3]]),
                "commit_chunk_ms": ms([c[1] - c[2] for c in rest if c[3]])}


@dataclass
class _Pending:
    """A chunk submitted to the group and not yet collected."""

    start: int
    k: int
    handle: Any
    submitted: float  # time.time()


class Coordinator:
    """Drives a `WorkerGroup` from `commit.step` to `total_steps`.

    When the placement allows it (`Placement.pipelines`: Ray workers with the update on
    the workers, replicated or sharded), the next chunk is queued before the current
    one's results arrive, so the workers never wait for the coordinator's bookkeeping or
    for the round trip; a failure or a stop discards or drains that queued chunk.
    """

    def __init__(self, config: TrainConfig, group_factory: Callable[[int], WorkerGroup],
                 placement: Placement, total_steps: int, commit: Commit,
                 observer: Observer | None = None, *,
                 stop: Callable[[], float | None] | None = None, stop_grace: float = 5.0,
                 sizer=None):
        """`stop()` returns when a stop was requested (time.monotonic()) or None; `sizer`
        (`FixedSize`/`ElasticSize`) decides each new group's size."""
        self.config = config
        self.group_factory = group_factory
        self.placement = placement
        self.total_steps = total_steps
        self.keeper = CommitKeeper(commit)
        # Steps done; the newest commit may be older: the state travels only every
        # --commit-seconds (shipping it costs ~10 ms for the reference MLP), stats every chunk.
        self.step = commit.step
        self.consecutive_skips = commit.consecutive_skips
        self._state_at = time.monotonic()
        self.observer = observer or NullObserver()
        self.policy = SkipPolicy(config.on_nonfinite, config.max_consecutive_skips)
        self.stop = stop or (lambda: None)
        self.stop_grace = stop_grace
        self.state = State.STARTING
        self.stats = RunStats()
        self.group: WorkerGroup | None = None
        self.failures = 0
        self._step_estimate: float | None = None
        self._t_fail = 0.0
        self.worker_pids: list[int] = []  # every worker process started, for leak checks
        self.sizer = sizer or FixedSize(config.world_size)
        self._next_size: int | None = None
        self._queued: _Pending | None = None  # the chunk queued behind the one collected
        self._last_done = 0.0  # time.time() when the last chunk's results arrived
        self._resuming: dict | None = None  # the failure whose new group has not stepped yet
        self._stop_sent = False  # the group was asked to stop (see _while_waiting)

    @property
    def commit(self) -> Commit:
        return self.keeper.newest

    # ------------------------------------------------------------------------------
    def _start_group(self) -> None:
        try:
            size = self._next_size or self.sizer.size()
        except CapacityTimeout as exc:
            safe = self.keeper.safe()
            raise TrainingFailed(f"{exc}; the last commit is at step {safe.step}") from None
        self._next_size = None
        self.group = self.group_factory(size)
        self.group.interrupt = self._while_waiting
        self._stop_sent = False
        try:
            self.group.start()
        finally:
            self.worker_pids += list(getattr(self.group, "pids", []))
        self.placement.restore(self.group, self.commit.step, self.commit.state)
        self._state_at = time.monotonic()

    def _while_waiting(self) -> bool:
        """Polled while the group works: on a stop, the group is asked once to end the
        running chunk within a step and run no step of the queued one (where the workers
        run the step loop and can: `request_stop`); True (abandon the chunk in flight) once
        the stop was requested more than `stop_grace` seconds ago."""
        t = self.stop()
        if t is None:
            return False
        if (not self._stop_sent and hasattr(self.group, "request_stop")
                and self.placement.pipelines(self.group)):
            self._stop_sent = True
            self.group.request_stop()
        return time.monotonic() - t > self.stop_grace

    def _chunk_size(self, step: int) -> int:
        c = self.config
        remaining = self.total_steps - step
        if c.chunk_steps:
            k = c.chunk_steps
        elif self._step_estimate is None:
            k = 2  # a short first chunk measures the step time
        else:
            k = int(max(1, min(10_000, round(CHUNK_SECONDS / max(self._step_estimate, 1e-6)))))
        if c.checkpoint_every:
            k = min(k, c.checkpoint_every - step % c.checkpoint_every)
        return max(1, min(k, remaining))

    def _deadline(self, k: int) -> float:
        """Watchdog: `--watchdog-seconds`, else generous while the step time is unknown
        (start-up, first chunk), then max(20 s, 10× the expected chunk time)."""
        if self.config.watchdog_seconds:
            return self.config.watchdog_seconds
        if self._step_estimate is None:
            return 300.0
        return max(20.0, 10.0 * k * self._step_estimate)

    def run(self) -> Commit:
        """Train to `total_steps` (or until a stop request); returns the last commit.

        Raises `TrainingFailed`. A failure while starting the group (a worker that
        never joins) counts against `--max-failures` like one during training.
        """
        try:
            while (self.step < self.total_steps and self.stop() is None) or self._queued:
                try:
                    if self.group is None:
                        self._start_group()
                        if self.state is State.RECOVERING:
                            self.stats.restarts += 1
                            self.stats.recovery_seconds.append(time.monotonic() - self._t_fail)
                        self.state = State.RUNNING
                    self._run_one_chunk()
                    self._maybe_grow()
                except WorkerFailure as exc:
                    self._recover(exc)
                except ChunkAbandoned:
                    self._queued = None
                    self._rewind()  # the group is mid-chunk: the last commit is what holds
                    break
            if self.group is not None:
                self._commit_now()
            final = self.keeper.safe()
            final.resolved()  # fetch the state while Ray is still up
            self.keeper.offer(final)
            self.state = State.FINISHED if final.step >= self.total_steps else State.STOPPED
            return final
        except ReplicasDiverged as exc:
            self.state = State.FAILED
            raise TrainingFailed(str(exc)) from None
        except BaseException:
            self.state = State.FAILED
            raise
        finally:
            if self.group is not None:
                self.group.shutdown(graceful=self.state is State.FINISHED)
                self.group = None

    def _maybe_grow(self) -> None:
        """Below the most workers asked for and capacity came back: restart the group larger
        from the newest commit (a resize, not a failure)."""
        if self.group is None or self.step >= self.total_steps:
            return
        new = self.sizer.grow_to(self.group.size)
        if new is None or new <= self.group.size:
            return
        old = self.group.size
        self._drain()
        self._commit_now()
        self.keeper = CommitKeeper(self.keeper.safe())  # on this node before the group goes
        self.group.shutdown(graceful=True)
        self.group = None
        self._next_size = new
        self.observer.on_restart(f"capacity for {new} workers (was {old})", "resize",
                                 self.step)

    def _recover(self, exc: WorkerFailure) -> None:
        """Kill the whole group (survivors are stuck inside MPI); the loop starts a new one
        from the newest commit that is safe on this node."""
        self.failures += 1
        self._t_fail = time.monotonic()
        self._queued = None
        step_at_failure = self.step
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        safe = self._rewind()
        self._resuming = {
            "detected_at": time.time(), "message": str(exc), "ranks": list(exc.ranks),
            "resume_step": safe.step, "reason": exc.reason,
            # the first sign and the GCS verdict wait (see WorkerFailure); the steps done
            # when it came; set by the new group's first chunk: when it was dispatched and
            # how long after this failure reached the coordinator (None: it never did)
            "noticed_at": exc.noticed_at, "verdict_seconds": exc.verdict_seconds,
            "step_at_failure": step_at_failure, "resumed_at": None, "reformed_seconds": None}
        self.stats.failures.append(self._resuming)
        if self.failures > self.config.max_failures:
            raise TrainingFailed(f"{exc}; giving up after {self.failures} failure(s) "
                                 f"(--max-failures {self.config.max_failures})") from None
        self.state = State.RECOVERING
        self.observer.on_restart(str(exc), exc.reason, safe.step)

    def _rewind(self) -> Commit:
        """Back to the newest commit held on this node; the observer forgets later steps."""
        safe = self.keeper.safe()
        self.keeper = CommitKeeper(safe)
        if safe.step != self.step:
            self.observer.on_rewind(safe.step)
        self.step, self.consecutive_skips = safe.step, safe.consecutive_skips
        return safe

    def _want_state(self, end: int) -> bool:
        """Ship the state with the chunk ending at step `end`? At the end, when a checkpoint
        is due, on a stop request, and every --commit-seconds."""
        c = self.config
        return (end >= self.total_steps or self.stop() is not None
                or bool(c.checkpoint_every and end % c.checkpoint_every == 0)
                or time.monotonic() - self._state_at >= c.commit_seconds)

    def _offer(self, state: Any) -> Commit:
        commit = Commit(self.step, state, self.consecutive_skips)
        self.keeper.offer(commit, local=getattr(self.group, "commit_is_local", True))
        self._state_at = time.monotonic()
        self.observer.on_commit(commit)
        return commit

    def _commit_now(self) -> None:
        """A commit at the current step, if the newest is older (a chunk of 0 steps)."""
        if self.commit.step != self.step:
            res = run_chunk(self.placement, self.group, self.step, 0, self.consecutive_skips,
                            self._deadline(1), want_state=True)
            self._offer(res.state)

    def _submit(self, start: int, consecutive: int | None) -> _Pending:
        k = self._chunk_size(start)
        t = time.time()
        want_state = self._want_state(start + k)
        if want_state:  # a chunk queued behind this one need not ship the state again
            self._state_at = time.monotonic()
        handle = self.placement.submit(self.group, start, k, consecutive, want_state)
        return _Pending(start, k, handle, t)

    def _drain(self) -> None:
        """Collect the queued chunk, if any (before anything that needs the group idle)."""
        if self._queued is not None:
            pending, self._queued = self._queued, None
            self._collect(pending)

    def _run_one_chunk(self) -> None:
        """Collect the next chunk; first queue the one after it when the placement allows."""
        pending, self._queued = self._queued, None
        if pending is None:
            pending = self._submit(self.step, self.consecutive_skips)
        end = pending.start + pending.k
        if (end < self.total_steps and self.stop() is None
                and self.placement.pipelines(self.group)):
            self._queued = self._submit(end, None)  # each worker goes on from its own count
        self._collect(pending)

    def _collect(self, pending: _Pending) -> None:
        step, k = pending.start, pending.k
        t0 = max(pending.submitted, self._last_done)
        if self.stats.first_step_start is None:
            self.stats.first_step_start = pending.submitted
        if self._resuming is not None:  # the first chunk of a group formed after a failure
            self._resuming.update(resumed_at=pending.submitted,
                                  reformed_seconds=time.monotonic() - self._t_fail)
            self._resuming = None
        res = self.placement.collect(self.group, pending.handle, self._deadline(k))
        stats = res.stats
        if step != self.step:  # queued behind a chunk a stop cut short: it ran no step
            if len(stats["step"]):
                raise RuntimeError(f"steps {step}.. ran after a chunk that ended at step "
                                   f"{self.step}")
            return
        self.stats.last_step_end = self._last_done = time.time()
        n = len(stats["step"])
        self.stats.chunks.append((n, self.stats.last_step_end - t0,
                                  float(stats["step_seconds"].sum()), res.state is not None))
        if n:
            self._step_estimate = float(np.median(stats["step_seconds"]))
        self.stats.samples += int(stats["samples"].sum())
        self.stats.skipped += int(stats["skipped"].sum())
        self.step, self.consecutive_skips = step + n, res.consecutive_skips
        self.observer.on_chunk(stats, res.memory, self.group.size)
        if res.state is not None:
            self._offer(res.state)
        skipped = np.flatnonzero(stats["skipped"])
        if skipped.size:  # the policy's verdict on the chunk's first skip, then its last step
            why = self.policy.failure(1, True, int(stats["step"][skipped[0]])) or \
                self.policy.failure(self.consecutive_skips, True, int(stats["step"][-1]))
            if why is not None:
                raise TrainingFailed(why)


def summarize_losses(losses: list[np.ndarray], last: int) -> float:
    """Mean of the last `last` finite step losses (the final epoch's training loss)."""
    if not losses:
        return math.nan
    allv = np.concatenate(losses)[-max(last, 1):]
    allv = allv[np.isfinite(allv)]
    return float(allv.mean()) if allv.size else math.nan


__all__ = ["Commit", "CommitKeeper", "Coordinator", "NullObserver", "Observer", "RunStats",
           "State", "TrainingFailed", "summarize_losses"]
