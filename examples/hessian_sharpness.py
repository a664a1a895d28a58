"""Second order by the R-operator: sharpness during gradient descent, and Newton-CG.

1. Full-batch gradient descent with step size η on a small tanh network; every N steps the
   top Hessian eigenvalue λ_max ("sharpness", power iteration on Hessian-vector products) is
   printed beside 2/η, the stability limit of GD on a quadratic (Cohen et al. 2021 find
   λ_max rising to it: the edge of stability).
2. Truncated Newton (Newton-CG, damped) on the same problem, against GD.
3. The HVP checked against finite differences of gradients.

Exits non-zero unless the HVP agrees with finite differences to 1e-6 (relative), Newton-CG
ends below GD's loss, and the sharpness rises during GD, staying positive and below 1.1·2/η.

    python examples/hessian_sharpness.py --small
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from distbackprop.nn import MLP
from distbackprop.nn.hessian import NewtonCG, hvp, top_eigenvalue


def problem(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, 2))
    return x, np.sin(2 * x[:, :1]) * np.cos(x[:, 1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a few seconds (CI size)")
    ap.add_argument("--lr", type=float, default=0.1, help="gradient-descent step size η")
    args = ap.parse_args()
    n, width, steps, every = (128, 16, 600, 100) if args.small else (512, 32, 5000, 500)
    x, y = problem(n)
    sizes = [2, width, width, 1]

    print(f"1. gradient descent, η = {args.lr}, 2/η = {2 / args.lr:.1f}; {sizes}, n = {n}")
    print(f"   {'step':>6} {'loss':>10} {'λ_max':>9}")
    model = MLP(sizes, activation="tanh", dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    sharpness = []
    for step in range(steps + 1):
        loss = model.loss_and_grad(x, y, "mse")
        if step % every == 0:
            lam = top_eigenvalue(model, x, y, "mse", iters=100, rng=rng, tol=1e-6)
            sharpness.append(lam)
            print(f"   {step:>6} {loss:>10.5f} {lam:>9.3f}")
        model.params[...] -= args.lr * model.grads
    gd_seconds = time.perf_counter() - t0

    print(f"\n2. Newton-CG (damped, ≤ 20 CG steps) vs GD ({steps} steps, {gd_seconds:.2f} s)")
    ncg = MLP(sizes, activation="tanh", dtype=np.float64, seed=0)
    opt = NewtonCG(damping=1e-2, cg_iters=20)
    t0 = time.perf_counter()
    newton_steps = 30 if args.small else 100
    for k in range(1, newton_steps + 1):
        info = opt.step_(ncg, x, y, "mse")
        if k % (newton_steps // 5) == 0:
            print(f"   step {k:>3}: loss {info['new_loss']:.6f}  damping {info['damping']:.2e}"
                  f"  CG iters {info['cg_iters']:>2}  ρ {info['rho']:.2f}")
    print(f"   Newton-CG: {newton_steps} steps in {time.perf_counter() - t0:.2f} s, "
          f"loss {info['new_loss']:.6f}; GD ended at {loss:.6f}")

    v = rng.standard_normal(model.params.size)
    p0 = model.params.copy()
    eps = 1e-5
    model.params[...] = p0 + eps * v
    model.loss_and_grad(x, y, "mse")
    gp = model.grads.copy()
    model.params[...] = p0 - eps * v
    model.loss_and_grad(x, y, "mse")
    model.params[...] = p0
    fd = (gp - model.grads) / (2 * eps)
    hv = hvp(model, x, y, v, "mse")
    rel = float(np.linalg.norm(hv - fd) / np.linalg.norm(fd))
    print(f"\n3. HVP vs finite differences of gradients: relative error {rel:.2e}")

    if not rel < 1e-6:
        raise SystemExit(f"FAILED: HVP vs finite differences {rel:.2e} ≥ 1e-6")
    if not info["new_loss"] < loss:
        raise SystemExit(f"FAILED: Newton-CG loss {info['new_loss']:.6f} not below GD's "
                         f"{loss:.6f}")
    # Sharpening up to, not past, the edge: λ_max hovers around 2/η once it gets there.
    if not (all(0 < lam < 1.1 * 2 / args.lr for lam in sharpness)
            and sharpness[-1] > sharpness[0]):
        raise SystemExit(f"FAILED: sharpness did not rise within (0, 1.1·2/η): {sharpness}")


if __name__ == "__main__":
    main()
