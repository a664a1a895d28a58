"""One training step, written once: gradient → health → collective skip decision → update.

Every update placement runs the same `run_steps_` loop: the replicated placement
inside each worker (the gradient source is the worker itself and the update
touches its own replica), the coordinator placement on the coordinator (the
gradient source asks the group for rank 0's reduced gradient and the update
touches the coordinator's master copy). The loop records one row per step in a
`StepStats` and applies the one non-finite policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..metrics.health import PHASES, StepStats


@dataclass
class Gradient:
    """The reduced (global-mean) gradient of one step and what the step learned about it.

    `grads` (P,) is identical on every rank; `health` is a `grad_health` result;
    `skip` was decided collectively; `phases` (4,) are the data, forward,
    backward and allreduce seconds (the update's time is added by the step).
    """

    loss: float
    samples: int
    grads: np.ndarray
    health: dict
    skip: bool
    phases: np.ndarray


class GradientSource(Protocol):
    def gradient(self, step: int) -> Gradient: ...


class UpdateRuleLike(Protocol):
    def lr(self, step: int) -> float: ...
    def step_(self, params: np.ndarray, grads: np.ndarray, step: int, gnorm: float) -> float: ...
    def update_ratios(self) -> np.ndarray: ...


@dataclass(frozen=True)
class SkipPolicy:
    """`--on-nonfinite skip|abort` and `--max-consecutive-skips`: the one non-finite policy.

    The count of consecutive skipped steps is the coordinator's state; a chunk
    starts from it and returns the steps it ran, so the count survives restarts.
    """

    on_nonfinite: str = "skip"
    max_consecutive: int = 3

    def count(self, consecutive: int, skipped: bool) -> int:
        return consecutive + 1 if skipped else 0

    def failure(self, consecutive: int, skipped: bool, step: int) -> str | None:
        """Why the run must stop after `step` (None: go on)."""
        if skipped and self.on_nonfinite == "abort":
            return f"non-finite gradient at step {step} (--on-nonfinite abort)"
        if consecutive >= self.max_consecutive:
            return (f"{consecutive} consecutive steps skipped for non-finite gradients, ending "
                    f"at step {step} (--max-consecutive-skips {self.max_consecutive}); try a "
                    "lower --lr or --clip-norm")
        return None


def train_step_(source: GradientSource, rule: UpdateRuleLike, params: np.ndarray, step: int,
                epoch: int, stats: StepStats, t0: float | None = None) -> tuple[bool, float]:
    """One step: g = ∇L(θ) reduced over ranks, then θ ← rule(θ, g) unless skipped.

    Updates `params` in place and records the step's row in `stats`, its `step_seconds`
    counted from `t0` (`time.perf_counter()`; default: now). Returns (skip, the time it
    ended).
    """
    t0 = time.perf_counter() if t0 is None else t0
    g = source.gradient(step)
    t_update = time.perf_counter()
    if g.skip:
        lr, ratios = rule.lr(step), None
    else:
        lr = rule.step_(params, g.grads, step, g.health["grad_global_norm"])
        ratios = rule.update_ratios()
    t_end = time.perf_counter()
    phases = np.empty(len(PHASES))
    phases[:4] = g.phases
    phases[4] = t_end - t_update
    stats.record(step=step, epoch=epoch, loss=g.loss, samples=g.samples, lr=lr,
                 health=g.health, update_ratio=ratios, skipped=g.skip,
                 step_seconds=t_end - t0, phase_seconds=phases)
    # the step's own bookkeeping (its row, ~20-50 µs with caches cold from the GEMMs) is
    # part of the step: `step_seconds` ends after it, so what a chunk adds stays apart
    t_end = time.perf_counter()
    stats.step_seconds[stats.n - 1] = t_end - t0
    return g.skip, t_end


def run_steps_(source: GradientSource, rule: UpdateRuleLike, params: np.ndarray, start: int,
               k: int, steps_per_epoch: int, stats: StepStats, policy: SkipPolicy,
               consecutive: int, sharpness: Callable[[int], float] | None = None,
               sharpness_every: int | None = None) -> int:
    """Steps [start, start + k) into `stats` (reset first); stops early when the policy says so.

    Returns the consecutive-skip count after the last step run.
    """
    stats.reset(k)
    t = time.perf_counter()  # a step's time runs from the end of the one before: the
    for step in range(start, start + k):  # loop's own ~10 µs per step are the steps'
        value = np.nan
        if sharpness is not None and sharpness_every and step % sharpness_every == 0:
            value = sharpness(step)
        skipped, t = train_step_(source, rule, params, step, step // steps_per_epoch, stats, t)
        stats.sharpness[stats.n - 1] = value
        consecutive = policy.count(consecutive, skipped)
        if policy.failure(consecutive, skipped, step) is not None:
            break
    return consecutive


__all__ = ["Gradient", "GradientSource", "SkipPolicy", "run_steps_", "train_step_"]
