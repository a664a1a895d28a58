"""Gradient checkpointing: keep every k-th layer's input, recompute the rest in backward.

A 16-layer relu MLP, float32: for the plain path and for k = 2, 4, 8 prints the activation
bytes held for backward after forward, the peak held during the step, the buffers each path
allocated, the median time of forward + backward, and whether the gradients are
bit-for-bit those of the plain path. Exits non-zero unless every k gives bit-identical
gradients, holds exactly 1/k of the plain path's activation bytes after forward (16 blocks,
uniform width), and peaks below the plain path. Times are printed, not checked (noise).

    python examples/remat_memory.py --small
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from distbackprop.nn import MLP
from distbackprop.nn.remat import CheckpointedMLP, plain_workspace_bytes


def interleaved_median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms per callable, timed round-robin so all see the same machine load."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a few seconds (CI size)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads (1: a worker's default, and steady timings on a busy box)")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads, user_api="blas"):
        run(args)


def run(args: argparse.Namespace) -> None:
    width, batch, repeats = (128, 64, 10) if args.small else (512, 256, 20)
    depth = 16
    rng = np.random.default_rng(0)
    model = MLP([width] * depth + [10], activation="relu", dtype=np.float32, seed=0)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    y = rng.integers(0, 10, batch)

    model.loss_and_grad(x, y, "cross_entropy")
    plain_grads = model.grads.copy()
    model.forward(x)
    plain_held = model.activation_bytes()
    model.release_()
    rows = {}
    paths = {"plain": model}
    for k in (2, 4, 8):
        c = paths[f"k={k}"] = CheckpointedMLP(model, every=k)
        c.forward(x)
        held = c.activation_bytes()
        c.release_()
        c.loss_and_grad(x, y, "cross_entropy")
        same = np.array_equal(model.grads, plain_grads)
        rows[f"k={k}"] = (held, c.peak_activation_bytes, c.workspace_bytes(),
                          "bit-identical" if same else "DIFFERENT")
    rows["plain"] = (plain_held, plain_held, plain_workspace_bytes(model), "")
    ms = interleaved_median_ms(
        {name: (lambda m=m: m.loss_and_grad(x, y, "cross_entropy")) for name, m in paths.items()},
        repeats)
    print(f"{depth}-layer MLP, width {width}, batch {batch}, float32 (forward + backward)")
    print(f"  {'path':<9} {'held KiB':>9} {'peak KiB':>9} {'buffers KiB':>12} {'held ↓':>7} "
          f"{'ms':>8} {'time ×':>7}  gradients")
    for name in paths:
        held, peak, buffers, same = rows[name]
        print(f"  {name:<9} {held / 1024:>9.0f} {peak / 1024:>9.0f} {buffers / 1024:>12.0f} "
              f"{plain_held / held:>7.2f} {ms[name]:>8.2f} {ms[name] / ms['plain']:>7.2f}  {same}")

    for k in (2, 4, 8):
        held, peak, _, same = rows[f"k={k}"]
        if same != "bit-identical":
            raise SystemExit(f"FAILED: k={k} gradients differ from the plain path")
        if held * k != plain_held or not peak < plain_held:
            raise SystemExit(f"FAILED: k={k} holds {held} B (expected {plain_held // k}), "
                             f"peak {peak} B (plain {plain_held})")


if __name__ == "__main__":
    main()
