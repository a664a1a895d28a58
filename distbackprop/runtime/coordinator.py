"""`Coordinator`: owns the training state and the loop over chunks.

A small state machine, STARTING → RUNNING → RECOVERING → FINISHED | FAILED,
with its collaborators injected (a group factory, the metrics sink, the
checkpoint writer), so it runs the same in one process, over Ray actors, and
under mpiexec.

Each chunk the coordinator receives per-step statistics, verifies that the
replicas' parameter checksums agree, feeds metrics and history, and commits
the state in memory (so a worker failure rewinds at most one chunk) and, when
due, to disk.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import TrainConfig
from .group import WorkerFailure, WorkerGroup
from .worker import (
    PHASES,
    StatsBuffer,
    build_optimizer,
    build_schedule,
    optimizer_part,
    pack_state,
    update_,
)


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    FINISHED = "finished"
    FAILED = "failed"


class TrainingFailed(RuntimeError):
    """Training could not complete (exit status 1); the message says why and where to resume."""


@dataclass
class Commit:
    """The last consistent training state: after `step` steps.

    `state` is a dict of arrays, or — in the Ray runtime — a reference to that
    dict in Ray's object store, owned by the coordinator (so it outlives the
    worker that produced it) and fetched only when needed: a checkpoint, a
    recovery, the end of the run. Shipping 3× the model each chunk through the
    driver cost ~1.5 ms per step on the reference MLP; a reference costs nothing.
    """

    step: int
    state: Any

    def resolved(self) -> dict[str, np.ndarray]:
        """The state as arrays (fetched once from the object store if need be)."""
        if not isinstance(self.state, dict):
            import ray
            self.state = ray.get(self.state)
        return self.state


@dataclass
class CoordinatorHooks:
    """Collaborators; each is optional."""

    on_chunk: Callable[[dict[str, np.ndarray], dict[int, dict]], None] | None = None
    on_commit: Callable[[Commit], None] | None = None  # e.g. write a checkpoint when due
    on_restart: Callable[[str], None] | None = None
    progress: Callable[[int, float], None] | None = None  # (steps done, last loss)


@dataclass
class RunStats:
    first_step_start: float | None = None
    last_step_end: float | None = None
    samples: int = 0
    restarts: int = 0
    skipped: int = 0
    recovery_seconds: list[float] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # when detected, why, which ranks
    # per chunk: (steps, wall seconds from dispatch to results, Σ step_seconds)
    chunks: list[tuple[int, float, float]] = field(default_factory=list)

    def coordination_seconds_per_step(self) -> float | None:
        """Median over chunks (the first, a warm-up, left out) of (wall − Σ step time)/steps:
        what dispatch, checksums, the state commit and metrics add to each step."""
        per = [(w - s) / n for n, w, s in self.chunks[1:] if n]
        return float(np.median(per)) if per else None
    losses: list[np.ndarray] = field(default_factory=list)


class Coordinator:
    """Drives a `WorkerGroup` from `commit.step` to `total_steps`."""

    def __init__(self, config: TrainConfig, group_factory: Callable[[], WorkerGroup],
                 total_steps: int, commit: Commit, model, steps_per_epoch: int,
                 hooks: CoordinatorHooks | None = None):
        """`model`: an MLP of the run's architecture (layer names, the update rule's shapes)."""
        self.config = config
        self.group_factory = group_factory
        self.total_steps = total_steps
        self.commit = commit
        self.hooks = hooks or CoordinatorHooks()
        self.state = State.STARTING
        self.stats = RunStats()
        self.group: WorkerGroup | None = None
        self.failures = 0
        self.layer_names = model.layer_names
        self.steps_per_epoch = steps_per_epoch
        self._step_estimate: float | None = None
        self._consecutive_skips = 0
        self.worker_pids: list[int] = []  # every worker process started, for leak checks
        # `--update-on coordinator`: the master copy and its optimizer live here.
        self.master: np.ndarray | None = None
        if config.update_on == "coordinator" and not config.local:
            self.master = commit.resolved()["params"].copy()
            self._opt = _MasterOptimizer(config, model, total_steps)
            self._opt.load(commit.resolved())

    # ------------------------------------------------------------------------------
    def _start_group(self) -> None:
        self.group = self.group_factory()
        try:
            self.group.start()
        finally:
            self.worker_pids += list(getattr(self.group, "pids", []))
        if self.commit.step > 0:  # at step 0 a new group's seeded init is the commit
            self.group.load_state(self.commit.state)

    def _chunk_size(self, step: int) -> int:
        c = self.config
        remaining = self.total_steps - step
        if c.chunk_steps:
            k = c.chunk_steps
        elif self._step_estimate is None:
            k = 2  # a short first chunk measures the step time
        else:
            k = int(max(1, min(10_000, round(1.0 / max(self._step_estimate, 1e-6)))))
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
        """Train to `total_steps`; returns the final commit. Raises `TrainingFailed`.

        A failure while starting the group (a worker that never joins) counts
        against `--max-failures` like one during training.
        """
        try:
            while self.commit.step < self.total_steps:
                try:
                    if self.group is None:
                        self._start_group()
                        if self.state is State.RECOVERING:
                            self.stats.restarts += 1
                            self.stats.recovery_seconds.append(time.monotonic() - self._t_fail)
                        self.state = State.RUNNING
                    self._run_one_chunk()
                except WorkerFailure as exc:
                    self._recover(exc)
            self.commit.resolved()  # fetch the final state while Ray is still up
            self.state = State.FINISHED
            return self.commit
        except BaseException:
            if self.state is not State.FINISHED:
                self.state = State.FAILED
            raise
        finally:
            if self.group is not None:
                self.group.shutdown(graceful=self.state is State.FINISHED)
                self.group = None

    def _recover(self, exc: WorkerFailure) -> None:
        """Kill the whole group (survivors are stuck inside MPI); the loop starts a new one."""
        self.failures += 1
        self._t_fail = time.monotonic()
        self.stats.failures.append({"detected_at": time.time(), "message": str(exc),
                                    "ranks": list(exc.ranks), "resume_step": self.commit.step})
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        if self.failures > self.config.max_failures:
            raise TrainingFailed(f"{exc}; giving up after {self.failures} failure(s) "
                                 f"(--max-failures {self.config.max_failures})") from None
        self.state = State.RECOVERING
        if self.hooks.on_restart:
            self.hooks.on_restart(str(exc))

    def _run_one_chunk(self) -> None:
        step = self.commit.step
        k = self._chunk_size(step)
        t0 = time.time()
        if self.stats.first_step_start is None:
            self.stats.first_step_start = t0
        if self.master is not None:
            stats, memory = self._coordinator_chunk(step, k)
            state = self._opt.state_with(self.master)
        else:
            results, state = self.group.run_chunk(step, k, self._deadline(k))
            _check_replicas(results)
            stats = results[0]["stats"]
            memory = {r["rank"]: r["memory"] for r in results}
        self.stats.last_step_end = time.time()
        n = len(stats["step"])
        self.stats.chunks.append((n, self.stats.last_step_end - t0,
                                  float(stats["step_seconds"].sum())))
        if n:
            self._step_estimate = float(np.median(stats["step_seconds"]))
        self.stats.samples += int(stats["samples"].sum())
        self.stats.skipped += int(stats["skipped"].sum())
        self.stats.losses.append(stats["loss"].copy())
        self.commit = Commit(step + n, state)
        if self.hooks.on_chunk:
            self.hooks.on_chunk(stats, memory)
        if self.hooks.progress and n:
            self.hooks.progress(self.commit.step, float(stats["loss"][-1]))
        if self.hooks.on_commit:
            self.hooks.on_commit(self.commit)
        skips = _trailing_true(stats["skipped"])
        self._consecutive_skips = skips if skips < n else self._consecutive_skips + n
        skips = self._consecutive_skips
        if n and stats["skipped"][-1] and self.config.on_nonfinite == "abort":
            raise TrainingFailed(f"non-finite gradient at step {int(stats['step'][-1])} "
                                 "(--on-nonfinite abort)")
        if skips >= self.config.max_consecutive_skips:
            raise TrainingFailed(
                f"{skips} consecutive steps skipped for non-finite gradients, ending at step "
                f"{int(stats['step'][-1])} (--max-consecutive-skips "
                f"{self.config.max_consecutive_skips}); try a lower --lr or --clip-norm")

    def _coordinator_chunk(self, start: int, k: int) -> tuple[dict[str, np.ndarray], dict]:
        """Parameter-server placement: per step, workers reduce, the coordinator updates."""
        buf = StatsBuffer(k, len(self.layer_names))
        a = buf.a
        memory: dict[int, dict] = {}
        n = 0
        consecutive = self._consecutive_skips
        for i in range(k):
            step = start + i
            t0 = time.perf_counter()
            r = self.group.grad_step(step, self.master, self._deadline(1))
            t_upd = time.perf_counter()
            lr = self._opt.schedule(step)
            if r["skipped"]:
                consecutive += 1
                a["update_ratio"][i] = 0.0
            else:
                consecutive = 0
                lr = self._opt.step(self.master, r["grads"], step, r["grad_global_norm"])
                a["update_ratio"][i] = self._opt.optimizer.update_ratios()
            t1 = time.perf_counter()
            a["step"][i], a["epoch"][i] = step, 0
            a["loss"][i], a["samples"][i], a["lr"][i] = r["loss"], r["samples"], lr
            a["grad_global_norm"][i], a["grad_norm"][i] = r["grad_global_norm"], r["grad_norm"]
            a["grad_max_abs"][i] = r["grad_max_abs"]
            a["nonfinite"][i], a["skipped"][i] = r["nonfinite"], r["skipped"]
            a["step_seconds"][i] = t1 - t0
            a["phase_seconds"][i] = r["phase_seconds"]
            a["phase_seconds"][i][PHASES.index("update")] = t1 - t_upd
            memory = r.get("memory_all", {0: r["memory"]})
            n = i + 1
            if consecutive >= self.config.max_consecutive_skips or (
                    r["skipped"] and self.config.on_nonfinite == "abort"):
                break
        out = buf.trimmed(n)
        out["epoch"][:] = out["step"] // self.steps_per_epoch
        return out, memory


class _MasterOptimizer:
    """The coordinator's copy of the update rule for `--update-on coordinator`."""

    def __init__(self, config: TrainConfig, model, total_steps: int):
        self.config = config
        self.optimizer = build_optimizer(config, model)
        self.schedule = build_schedule(config, total_steps)

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.optimizer.load_state_(optimizer_part(state))

    def step(self, params: np.ndarray, grads: np.ndarray, step: int, gnorm: float) -> float:
        return update_(self.config, self.schedule, self.optimizer, params, grads, step, gnorm)

    def state_with(self, params: np.ndarray) -> dict[str, np.ndarray]:
        return pack_state(params, self.optimizer)


def _check_replicas(results: list[dict[str, Any]]) -> None:
    sums = [r["checksum"] for r in results]
    if any(s != sums[0] for s in sums[1:]):
        detail = ", ".join(f"rank {r['rank']}: crc32={int(s):08x}"
                           for r, s in zip(results, sums, strict=True))
        raise TrainingFailed(f"replicas diverged (parameter checksums differ: {detail})")


def _trailing_true(flags: np.ndarray) -> int:
    n = 0
    for f in reversed(np.asarray(flags)):
        if not f:
            break
        n += 1
    return n


def initial_commit(config: TrainConfig, n_in: int, n_out: int) -> Commit:
    """Step 0: the seeded initial parameters and a zero optimizer state."""
    from .worker import build_model
    model = build_model(config, n_in, n_out)
    return Commit(0, pack_state(model.params, build_optimizer(config, model)))


def summarize_losses(losses: list[np.ndarray], last: int) -> float:
    """Mean of the last `last` finite step losses (the final epoch's training loss)."""
    if not losses:
        return math.nan
    allv = np.concatenate(losses)[-max(last, 1):]
    allv = allv[np.isfinite(allv)]
    return float(allv.mean()) if allv.size else math.nan


__all__ = ["Coordinator", "CoordinatorHooks", "Commit", "State", "TrainingFailed",
           "initial_commit", "summarize_losses"]
