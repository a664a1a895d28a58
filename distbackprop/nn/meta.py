"""Meta-gradients through k inner SGD steps (MAML, Finn et al. 2017), with R-operator HVPs.

Inner loop on a task's support set:   θ_{i+1} = θ_i − α ∇L_s(θ_i),  i = 0 … k−1
Outer (query) loss:                   L_q(θ_k(θ_0))
Meta-gradient, since ∂θ_{i+1}/∂θ_i = I − α H_s(θ_i) (symmetric):
    ∇_{θ_0} L_q = (I − α H_s(θ_0)) ⋯ (I − α H_s(θ_{k−1})) ∇L_q(θ_k)
computed backward from g = ∇L_q(θ_k) by g ← g − α H_s(θ_i) g, i = k−1 … 0. Each θ_i's
`HessianOperator` comes from the same forward/backward that produced the inner gradient, so
the second-order term costs one R-forward + R-backward per inner step.

`first_order=True` drops the Hessian terms (FOMAML): ∇_{θ_0} L_q ≈ ∇L_q(θ_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .hessian import HessianOperator
from .losses import loss_value


@dataclass(frozen=True)
class Task:
    """One few-shot regression task: support rows to adapt on, query rows to score.

    x_*: (rows, n_in); y_*: (rows, n_out).
    """

    x_support: np.ndarray
    y_support: np.ndarray
    x_query: np.ndarray
    y_query: np.ndarray


def sine_tasks(rng: np.random.Generator, n_tasks: int, n_support: int = 10, n_query: int = 10,
               amplitude: tuple[float, float] = (0.1, 5.0),
               phase: tuple[float, float] = (0.0, np.pi),
               x_range: tuple[float, float] = (-5.0, 5.0), dtype=np.float64) -> list[Task]:
    """The MAML sine family: y = A sin(x − φ), A ~ U(amplitude), φ ~ U(phase), x ~ U(x_range)."""
    tasks = []
    for _ in range(n_tasks):
        A = rng.uniform(*amplitude)
        phi = rng.uniform(*phase)
        xs = rng.uniform(*x_range, (n_support, 1)).astype(dtype)
        xq = rng.uniform(*x_range, (n_query, 1)).astype(dtype)
        tasks.append(Task(xs, (A * np.sin(xs - phi)).astype(dtype),
                          xq, (A * np.sin(xq - phi)).astype(dtype)))
    return tasks


def adapt_(model: Any, x: np.ndarray, y: np.ndarray, inner_lr: float, steps: int,
           loss: str = "mse") -> list[HessianOperator]:
    """`steps` SGD steps in place: θ ← θ − α ∇L_s(θ) with L_s the batch mean over (x, y).

    Returns the linearization at each visited θ_0 … θ_{k−1} (their `grad` and `matvec`).
    """
    ops = []
    for _ in range(steps):
        op = HessianOperator(model, x, y, loss)
        p = model.params
        p -= inner_lr * op.grad
        ops.append(op)
    return ops


def maml_task_loss_and_grad(model: Any, task: Task, inner_lr: float, steps: int,
                            loss: str = "mse", first_order: bool = False
                            ) -> tuple[float, np.ndarray]:
    """(L_q(θ_k), ∇_{θ_0} L_q) for one task at θ_0 = `model.params`, which is restored."""
    theta0 = model.params.copy()
    try:
        ops = adapt_(model, task.x_support, task.y_support, inner_lr, steps, loss)
        value = model.loss_and_grad(task.x_query, task.y_query, loss)
        g = model.grads.copy()
        if not first_order:
            for op in reversed(ops):
                g -= inner_lr * op.matvec(g)
    finally:
        model.params[...] = theta0
    return value, g


def maml_loss_and_grad(model: Any, tasks: list[Task], inner_lr: float, inner_steps: int,
                       loss: str = "mse", denom: float | None = None,
                       first_order: bool = False) -> float:
    """Outer loss Σ_tasks L_q(θ_k) / denom; `model.grads` ← its gradient w.r.t. θ_0.

    denom defaults to len(tasks); data-parallel workers split the tasks and pass the global
    task count, so a SUM-allreduce of `grads` gives the meta-batch mean.
    """
    d = float(denom if denom is not None else max(len(tasks), 1))
    acc = np.zeros_like(model.params)
    total = 0.0
    for task in tasks:
        value, g = maml_task_loss_and_grad(model, task, inner_lr, inner_steps, loss, first_order)
        acc += g
        total += value
    model.grads[...] = acc / d
    return total / d


def adapted_loss(model: Any, task: Task, inner_lr: float, steps: int,
                 loss: str = "mse") -> float:
    """Query loss after `steps` inner SGD steps on the support set (params restored)."""
    theta0 = model.params.copy()
    try:
        for _ in range(steps):
            model.loss_and_grad(task.x_support, task.y_support, loss)
            p = model.params
            p -= inner_lr * model.grads
        y_hat = model.forward(task.x_query)
        value = loss_value(loss, y_hat, task.y_query)
        model.release_()
    finally:
        model.params[...] = theta0
    return value
