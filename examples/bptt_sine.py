"""Backpropagation through time on a sine forecast: full BPTT vs truncated to k steps.

An Elman RNN (h_t = tanh(W_x x_t + W_h h_{t−1} + b), ŷ_t = W_o h_t + b_o) learns to predict
x_{t+1} from x_1..x_t for sines of random frequency and phase. Prints the validation loss of
full and truncated BPTT, and ‖∂L/∂h_t‖ per time step (bucketed) for a loss on the last step
only, where vanishing over time shows. Exits non-zero unless both trainings cut the validation
loss at least 20-fold, the gradient reaching h_1 is below a tenth of that at h_T, and
truncation to k steps leaves exactly zero gradient before the last k.

    python examples/bptt_sine.py --small
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from distbackprop.nn.rnn import RNN, bucket_time_norms, sine_forecast_batch
from distbackprop.optim import make_optimizer


def train(truncate: int | None, steps: int, hidden: int, seq: int, batch: int,
          seed: int = 0) -> tuple[RNN, list[float]]:
    rng = np.random.default_rng(seed)
    model = RNN(1, hidden, 1, seed=seed)
    opt = make_optimizer("adam", model.params.size, np.float64)
    x_val, y_val = sine_forecast_batch(np.random.default_rng(999), 64, seq)
    curve = [model.loss_and_grad(x_val, y_val, "mse")]
    for step in range(1, steps + 1):
        x, y = sine_forecast_batch(rng, batch, seq)
        model.loss_and_grad(x, y, "mse", truncate=truncate)
        opt.step_(model.params, model.grads, 1e-2)
        if step % max(steps // 4, 1) == 0:
            curve.append(model.loss_and_grad(x_val, y_val, "mse"))
    return model, curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a few seconds (CI size)")
    ap.add_argument("--truncate", type=int, default=5, help="k for truncated BPTT")
    args = ap.parse_args()
    steps, hidden, seq = (150, 16, 30) if args.small else (1500, 32, 60)

    print(f"sine forecast: T={seq}, hidden={hidden}, {steps} Adam steps, batch 16")
    results, curves = {}, {}
    for label, k in (("full BPTT", None), (f"truncated k={args.truncate}", args.truncate)):
        t0 = time.perf_counter()
        model, curve = train(k, steps, hidden, seq, 16)
        results[label], curves[label] = model, curve
        print(f"  {label:<16} val loss {curve[0]:.4f} -> {curve[-1]:.5f}  "
              f"({time.perf_counter() - t0:.1f} s)  curve: "
              + " ".join(f"{v:.4f}" for v in curve))

    model = results["full BPTT"]
    x, y = sine_forecast_batch(np.random.default_rng(5), 32, seq)
    print("\n‖∂L/∂h_t‖ per time step (RMS per bucket), trained full-BPTT model:")
    model.loss_and_grad(x, y, "mse")
    print("  loss on every step:", _fmt(bucket_time_norms(model.time_grad_norms, 4)))
    model.loss_and_grad(x, y[:, -1], "mse", last_only=True)
    last = model.time_grad_norms
    print("  loss on last step: ", _fmt(bucket_time_norms(last, 4)))
    print(f"  last-step loss: gradient reaching h_1 is {last[0] / last[-1]:.2e} of that at h_T")
    model.loss_and_grad(x, y[:, -1], "mse", last_only=True, truncate=args.truncate)
    truncated = model.time_grad_norms
    print(f"  with truncate={args.truncate}:  ", _fmt(bucket_time_norms(truncated, 4)))

    for label, curve in curves.items():
        if not curve[-1] < curve[0] / 20:
            raise SystemExit(f"FAILED: {label} val loss {curve[0]:.4f} -> {curve[-1]:.5f}, "
                             "not cut 20-fold")
    if not last[0] / last[-1] < 0.1:
        raise SystemExit(f"FAILED: no vanishing: h_1 gets {last[0] / last[-1]:.2e} of h_T")
    if np.any(truncated[:-args.truncate] != 0) or not np.all(truncated[-args.truncate:] > 0):
        raise SystemExit(f"FAILED: truncate={args.truncate} must zero exactly the steps before "
                         "the last k")


def _fmt(buckets: dict[str, float]) -> str:
    return "  ".join(f"{k}: {v:.2e}" for k, v in buckets.items())


if __name__ == "__main__":
    main()
