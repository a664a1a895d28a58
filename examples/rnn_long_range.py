"""Vanishing gradients over time: a tanh RNN on the adding problem, trained by the runtime.

The adding problem (Hochreiter & Schmidhuber): each row is T steps of two features, a value
u_t ~ U(0, 1) and a marker m_t ∈ {0, 1}; exactly two steps are marked, one in the first
tenth of the sequence and one in the second half, and the target is Σ_t m_t u_t — read off
the last step's readout (``--sequence-target last``). To learn it, the gradient must reach
the early marked step through T − t applications of W_hᵀ·diag(1 − h²).

The script writes the data to Parquet (``fixed_size_list<fixed_size_list<double, 2>, T>``),
trains ``--model rnn`` through `Trainer` (``--local``; the per-time norms are reduced the same
way by N workers) and reads the per-time-bucket ‖∂L/∂h_t‖ back from history.parquet. It prints
the ratio first time bucket / last (the ``distbackprop_time_grad_ratio`` gauge), median over
the steps:

* for T = 10, 50, 100 with full BPTT — it falls by orders of magnitude as T grows;
* with ``--bptt-truncate 10`` — identical for T = 10 (no cut inside the sequence), exactly 0
  for T = 50 and 100 (the graph is cut: early steps get no gradient at all);
* at T = 50 for recurrent gains (the init scale of the orthogonal W_h, ‖W_h‖₂ = gain) of
  0.5 … 1.5: a larger gain carries the gradient further back.

Exits non-zero unless the full-BPTT ratio falls monotonically with T (and by > 1000× from
T = 10 to 100), truncation behaves as above, and the ratio rises monotonically with the gain.

    python examples/rnn_long_range.py --small
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from distbackprop import TrainConfig, Trainer
from distbackprop.data import load_training_data
from distbackprop.data.tables import write_sequence_parquet
from distbackprop.nn import SequenceRNN, time_ratio

T_VALUES = (10, 50, 100)
GAINS = (0.5, 0.9, 1.0, 1.5)
TRUNCATE = 10


def adding_problem(n: int, T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """x (n, T, 2): [u_t, m_t]; y (n,) = Σ_t m_t u_t with one mark in the first tenth and one
    in the second half."""
    u = rng.uniform(0.0, 1.0, (n, T))
    m = np.zeros((n, T))
    rows = np.arange(n)
    m[rows, rng.integers(0, max(T // 10, 1), n)] = 1.0
    m[rows, rng.integers(T // 2, T, n)] = 1.0
    return np.stack([u, m], axis=-1), (u * m).sum(axis=1)


def train(data: Path, out: Path, steps: int, hidden: int, truncate: int | None = None):
    cfg = TrainConfig(data=str(data), model="rnn", hidden=(hidden,), bptt_truncate=truncate,
                      local=True, max_steps=steps, batch_size=64, dtype="float64", lr=1e-3,
                      metrics_port=0, quiet=True, out=str(out), seed=0)
    return Trainer(cfg).fit()


def history_ratio(result) -> float:
    """Median over the run's steps of (first time bucket / last) from history.parquet."""
    h = result.history
    cols = [c for c in h.column_names if c.startswith("time_grad_norm/")]
    first, last = h.column(cols[0]).to_numpy(), h.column(cols[-1]).to_numpy()
    return float(np.median(first / last))


def gain_ratio(data: Path, T: int, hidden: int, gain: float, rows: int) -> float:
    """The ratio of one full-BPTT step at initialisation with W_h of spectral norm `gain`."""
    bundle = load_training_data(TrainConfig(data=str(data), dtype="float64", val_fraction=0.0))
    model = SequenceRNN(2, hidden, 1, T, recurrent_gain=gain, seed=0)
    model.loss_and_grad(bundle.x_train[:rows], bundle.y_train[:rows], "mse")
    return time_ratio(model.bucket_norms())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CI size: a few seconds per run")
    args = ap.parse_args()
    n, steps, hidden = (256, 12, 24) if args.small else (4096, 200, 64)
    rng = np.random.default_rng(0)
    full, cut, gains = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for T in T_VALUES:
            data = tmp / f"adding-T{T}.parquet"
            write_sequence_parquet(data, *adding_problem(n, T, rng))
            t0 = time.perf_counter()
            full[T] = history_ratio(train(data, tmp / f"full{T}", steps, hidden))
            cut[T] = history_ratio(train(data, tmp / f"cut{T}", steps, hidden, TRUNCATE))
            print(f"  T={T:<4} trained ({time.perf_counter() - t0:.1f} s)")
            if T == 50:
                gains = {g: gain_ratio(data, T, hidden, g, 64) for g in GAINS}

    print(f"\nadding problem, tanh RNN H={hidden}, {steps} Adam steps (batch 64, {n} rows):")
    print("‖∂L/∂h_t‖ first time bucket / last (median over the steps)")
    print(f"  {'T':>4}  {'full BPTT':>11}  {f'--bptt-truncate {TRUNCATE}':>19}")
    for T in T_VALUES:
        print(f"  {T:>4}  {full[T]:>11.2e}  {cut[T]:>19.2e}")
    print("\nrecurrent gain ‖W_h‖₂ at init, T=50, one full-BPTT step on 64 rows:")
    for g, r in gains.items():
        print(f"  gain {g:<4}  ratio {r:.2e}")

    ratios = [full[T] for T in T_VALUES]
    if not (ratios[0] > ratios[1] > ratios[2] and ratios[2] < ratios[0] / 1e3):
        raise SystemExit(f"FAILED: full-BPTT ratio does not fall > 1000x monotonically with T: "
                         f"{dict(zip(T_VALUES, ratios, strict=True))}")
    if cut[10] != full[10] or not all(cut[T] == 0.0 for T in T_VALUES if T > TRUNCATE):
        raise SystemExit(f"FAILED: --bptt-truncate {TRUNCATE} must leave T=10 as is and cut "
                         f"the first bucket to exactly 0 beyond: {cut}")
    g = list(gains.values())
    if not all(a < b for a, b in zip(g[:-1], g[1:], strict=True)):
        raise SystemExit(f"FAILED: ratio does not rise with the recurrent gain: {gains}")
    print("\nvanishing over time: the ratio falls with T, truncation cuts, gain carries it back")


if __name__ == "__main__":
    main()
