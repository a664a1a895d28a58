"""An implicit (equilibrium) layer trained through the implicit function theorem.

z* = tanh(W z* + U x + b) is found by fixed-point iteration; the gradient solves
(I − ∂f/∂z)ᵀ v = g instead of backpropagating through the iterations, so memory does not
grow with their number. After each Adam step W is projected to ‖W‖₂ ≤ 0.95, which
keeps f a contraction. Trains a classifier on two interleaved half-moons, then checks the
IFT gradient against unrolled backprop and finite differences, and shows the error a
non-contractive W produces. Exits non-zero unless training reaches 95 % accuracy, the IFT
gradient matches unrolled backprop to 1e-10 and finite differences to 1e-6 (relative), and the
non-contractive W raises `FixedPointError`.

    python examples/implicit_layer.py --small
"""

from __future__ import annotations

import argparse

import numpy as np

from distbackprop.nn import gradcheck
from distbackprop.nn.implicit import FixedPointError, ImplicitModel
from distbackprop.optim import make_optimizer


def moons(n: int, rng: np.random.Generator, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    t = rng.uniform(0, np.pi, n)
    label = rng.integers(0, 2, n)
    x = np.where(label[:, None] == 0,
                 np.column_stack([np.cos(t), np.sin(t)]),
                 np.column_stack([1 - np.cos(t), 0.5 - np.sin(t)]))
    return x + noise * rng.standard_normal((n, 2)), label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a few seconds (CI size)")
    args = ap.parse_args()
    n, hidden, steps = (256, 16, 300) if args.small else (512, 32, 1000)
    rng = np.random.default_rng(0)
    x, y = moons(n, rng)
    model = ImplicitModel(2, hidden, 2, seed=0, contraction=0.8, tol=1e-8)
    opt = make_optimizer("adam", model.params.size, np.float64)
    print(f"half-moons, n = {n}; implicit layer of {hidden} units; {steps} Adam steps")
    acc = 0.0
    for step in range(steps + 1):
        loss = model.loss_and_grad(x, y, "cross_entropy")
        if step % (steps // 5) == 0:
            acc = float(np.mean(model.forward(x).argmax(axis=1) == y))
            model.release_()
            print(f"  step {step:>5}: loss {loss:.4f}  acc {acc:.3f}  forward iters "
                  f"{model.forward_iterations:>3} (residual {model.forward_residual:.1e})  "
                  f"adjoint iters {model.backward_iterations:>3}  "
                  f"‖W‖₂ {np.linalg.norm(model.W, 2):.2f}")
        opt.step_(model.params, model.grads, 1e-2)
        model.project_(0.95)  # keep ‖W‖₂ < 1 so the fixed point exists and iteration finds it

    check = ImplicitModel(2, 6, 2, seed=1, tol=1e-14)
    check.params[...] += 0.1 * rng.standard_normal(check.params.size)
    xs, ys = x[:10], y[:10]
    check.loss_and_grad(xs, ys, "cross_entropy")
    ift = check.grads.copy()
    check.unrolled_loss_and_grad(xs, ys, check.forward_iterations + 50, "cross_entropy")
    unrolled = float(np.max(np.abs(check.grads - ift)))
    print(f"\nIFT vs unrolled backprop ({check.forward_iterations + 50} iterations): "
          f"max |difference| {unrolled:.1e}")
    fd = gradcheck(check, xs, ys, "cross_entropy").rel_error
    print(f"IFT vs finite differences: relative error {fd:.1e}")

    check.W[...] = -2.0 * np.eye(6)
    check.max_iter = 100
    try:
        check.forward(xs)
        raised = False
    except FixedPointError as exc:
        raised = True
        print(f"non-contractive W: {exc}")

    if not acc >= 0.95:
        raise SystemExit(f"FAILED: training accuracy {acc:.3f} < 0.95")
    if not unrolled < 1e-10:
        raise SystemExit(f"FAILED: IFT vs unrolled {unrolled:.1e} ≥ 1e-10")
    if not fd < 1e-6:
        raise SystemExit(f"FAILED: IFT vs finite differences {fd:.1e} ≥ 1e-6")
    if not raised:
        raise SystemExit("FAILED: a non-contractive W did not raise FixedPointError")


if __name__ == "__main__":
    main()
