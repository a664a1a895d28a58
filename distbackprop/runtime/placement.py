"""Where the coordinator's update rule runs: one strategy object per `--update-on` value.

* `Replicated` (`workers`): every replica runs the step loop and applies the rule
  right after the allreduce; replicas stay bit-identical (checked every chunk).
* `OnCoordinator` (`coordinator`): parameter-server style; per step the group
  returns rank 0's reduced gradient and the coordinator steps its master copy.

Both run `step.run_steps_`; they differ only in the gradient source and in whose
parameters the rule updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..metrics.health import StepStats
from .group import WorkerGroup
from .step import Gradient, run_steps_
from .worker import ReplicaSpec


@dataclass
class ChunkResult:
    stats: dict[str, np.ndarray]
    memory: dict[int, dict]
    state: Any  # dict of arrays, or an object-store reference to one
    consecutive_skips: int


class ReplicasDiverged(RuntimeError):
    """Replicas' parameter checksums differ after a chunk."""


class Placement(Protocol):
    def restore(self, group: WorkerGroup, step: int, state: Any) -> None: ...
    def pipelines(self, group: WorkerGroup) -> bool:
        """Whether a second chunk may be submitted before the first is collected."""
        ...
    def submit(self, group: WorkerGroup, start: int, k: int, consecutive: int | None,
               want_state: bool = True) -> Any: ...
    def collect(self, group: WorkerGroup, pending: Any, deadline: float) -> ChunkResult: ...


def run_chunk(placement: Placement, group: WorkerGroup, start: int, k: int,
              consecutive: int | None, deadline: float, want_state: bool = True) -> ChunkResult:
    """Submit one chunk and wait for it."""
    return placement.collect(group, placement.submit(group, start, k, consecutive, want_state),
                             deadline)


class Replicated:
    """The update runs on every replica (the default)."""

    def restore(self, group: WorkerGroup, step: int, state: Any) -> None:
        if step > 0:  # at step 0 a new group's seeded initialisation is the commit
            group.load_state(state)

    def pipelines(self, group: WorkerGroup) -> bool:
        return bool(getattr(group, "pipelines", False))

    def submit(self, group: WorkerGroup, start: int, k: int, consecutive: int | None,
               want_state: bool = True) -> Any:
        return group.submit_chunk(start, k, consecutive, want_state)

    def collect(self, group: WorkerGroup, pending: Any, deadline: float) -> ChunkResult:
        results, state = group.collect_chunk(pending, deadline)
        check_replicas(results)
        first = results[0]
        return ChunkResult(first["stats"], {r["rank"]: r["memory"] for r in results}, state,
                           first["consecutive_skips"])


class OnCoordinator:
    """The coordinator's master copy takes the update; workers only reduce gradients."""

    def __init__(self, spec: ReplicaSpec, model, steps_per_epoch: int):
        self.rule = spec.build_rule(model)
        self.policy = spec.skip_policy()
        self.master = model.params.copy()
        self.steps_per_epoch = steps_per_epoch
        self.stats = StepStats(1, model.layer_names)

    def restore(self, group: WorkerGroup, step: int, state: dict[str, np.ndarray]) -> None:
        self.master[...] = state["params"]
        self.rule.load_state_(state)

    def pipelines(self, group: WorkerGroup) -> bool:
        return False  # each step waits for the group's gradient: nothing to queue

    def submit(self, group: WorkerGroup, start: int, k: int, consecutive: int | None,
               want_state: bool = True) -> tuple:
        if consecutive is None:
            raise ValueError("the coordinator placement runs one chunk at a time: pass the "
                             "consecutive-skip count")
        return start, k, consecutive, want_state

    def collect(self, group: WorkerGroup, pending: tuple, deadline: float) -> ChunkResult:
        start, k, consecutive, want_state = pending
        source = _GroupGradient(group, self.master, deadline)
        consecutive = run_steps_(source, self.rule, self.master, start, k,
                                 self.steps_per_epoch, self.stats, self.policy, consecutive)
        state = {"params": self.master.copy(), **self.rule.state()} if want_state else None
        return ChunkResult(self.stats.as_dict(), source.memory, state, consecutive)


class _GroupGradient:
    """A gradient source that asks the group for the reduced gradient at `params`."""

    def __init__(self, group: WorkerGroup, params: np.ndarray, deadline: float):
        self.group, self.params, self.deadline = group, params, deadline
        self.memory: dict[int, dict] = {}

    def gradient(self, step: int) -> Gradient:
        r = self.group.grad_step(step, self.params, self.deadline)
        self.memory = r.get("memory_all", {0: r["memory"]})
        return Gradient(r["loss"], r["samples"], r["grads"], r["health"], r["skip"],
                        r["phases"])


def check_replicas(results: list[dict[str, Any]]) -> None:
    """Every rank's parameter checksum must be the same bit pattern.

    The workers send checksums with each chunk that ships the state (every commit and
    the run's last chunk), so no commit or saved model ever holds replicas that disagree,
    while the chunks in between skip the pass over the parameters. A chunk without
    checksums passes."""
    sums = [r["checksum"] for r in results if "checksum" in r]
    if len(sums) not in (0, len(results)):
        raise ValueError(f"checksums from {len(sums)} of {len(results)} ranks")
    if any(s != sums[0] for s in sums[1:]):
        detail = ", ".join(f"rank {r['rank']}: {int(s[0]):013x}-{int(s[1]):013x}"
                           for r, s in zip(results, sums, strict=True))
        raise ReplicasDiverged(f"replicas diverged (parameter checksums differ: {detail})")


def make_placement(spec: ReplicaSpec, model, steps_per_epoch: int) -> Placement:
    """The strategy for `--update-on`; `--local` always updates in its one replica."""
    c = spec.config
    if c.update_on == "coordinator" and not c.local:
        return OnCoordinator(spec, model, steps_per_epoch)
    return Replicated()


__all__ = ["ChunkResult", "OnCoordinator", "Placement", "Replicated", "ReplicasDiverged",
           "check_replicas", "make_placement", "run_chunk"]
