"""A binarized-activation MLP on the embedded digits: sign hidden units, straight-through backward.

The hidden units output sign(z) ∈ {−1, +1}, whose derivative is 0 almost everywhere; the
straight-through estimator backpropagates dh ⊙ 1{|z| ≤ 1} instead — the derivative of
hardtanh = clip(z, −1, 1), its differentiable counterpart. The same network is trained with
sign, with 2-bit `round` (4 levels, same surrogate), with hardtanh and with relu (same data
split, initialization and optimizer) and the validation accuracies are printed side by side.
Exits non-zero if the sign network is below 0.85, or if its hidden units are not binary.

    python examples/binarized_digits.py --small
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow.parquet as pq

from distbackprop.data import embedded_digits_path
from distbackprop.nn import MLP
from distbackprop.optim import make_optimizer

SIGN_MIN_ACCURACY = 0.85


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): 80/20 split, standardized with the train statistics."""
    t = pq.read_table(embedded_digits_path())
    y = t.column("target").to_numpy().astype(np.int64)
    x = np.column_stack([t.column(c).to_numpy() for c in t.column_names if c != "target"])
    x = x.astype(np.float64)
    idx = np.random.default_rng(seed).permutation(len(y))
    n_val = len(y) // 5
    val, train = idx[:n_val], idx[n_val:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    std[std == 0] = 1.0  # pixels that are always blank
    x = (x - mean) / std
    return x[train], y[train], x[val], y[val]


def train(activation: str, data, hidden: int, epochs: int, batch: int, lr: float,
          quantize_bits: int | None = None) -> tuple[MLP, float, float]:
    """Adam on the cross-entropy; returns (model, train accuracy, validation accuracy)."""
    x, y, x_val, y_val = data
    model = MLP([x.shape[1], hidden, 10], activation=activation, dtype=np.float64, seed=0,
                init="xavier", quantize_bits=quantize_bits)
    opt = make_optimizer("adam", model.params.size, np.float64)
    rng = np.random.default_rng(1)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y), batch):
            rows = order[i:i + batch]
            model.loss_and_grad(x[rows], y[rows], "cross_entropy")
            opt.step_(model.params, model.grads, lr)
    acc = float(np.mean(model.predict(x).argmax(axis=1) == y))
    val_acc = float(np.mean(model.predict(x_val).argmax(axis=1) == y_val))
    return model, acc, val_acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a few seconds (CI size)")
    args = ap.parse_args()
    hidden, epochs = (128, 10) if args.small else (256, 30)
    data = digits()
    print(f"digits: {len(data[1])} train / {len(data[3])} validation rows; "
          f"MLP [64, {hidden}, 10], Adam lr 1e-3, batch 64, {epochs} epochs")
    print(f"  {'hidden units':<16} {'backward':<24} {'train acc':>9} {'val acc':>8} {'s':>5}")
    runs = [("sign", None, "STE: 1{|z| ≤ 1}"), ("round", 2, "STE: 1{|z| ≤ 1}"),
            ("hardtanh", None, "σ′ = 1{|z| ≤ 1}"), ("relu", None, "σ′ = 1{z > 0}")]
    val: dict[str, float] = {}
    models: dict[str, MLP] = {}
    for name, bits, backward in runs:
        t0 = time.perf_counter()
        model, acc, val_acc = train(name, data, hidden, epochs, 64, 1e-3, bits)
        label = f"{name} (K={bits})" if bits else name
        val[name], models[name] = val_acc, model
        print(f"  {label:<16} {backward:<24} {acc:>9.3f} {val_acc:>8.3f} "
              f"{time.perf_counter() - t0:>5.1f}")

    # The sign network really is binary: every hidden unit outputs −1 or +1.
    sign = models["sign"]
    h = sign.layers[1].forward(sign.layers[0].forward(data[2]))
    levels = np.unique(h)
    sign.release_()
    print(f"\nsign network: hidden outputs take the values {levels.tolist()}; "
          f"val accuracy {val['sign']:.3f} vs hardtanh {val['hardtanh']:.3f}, "
          f"relu {val['relu']:.3f}")
    if not np.array_equal(levels, [-1.0, 1.0]):
        raise SystemExit(f"FAILED: sign hidden units are not binary: {levels}")
    if val["sign"] < SIGN_MIN_ACCURACY:
        raise SystemExit(f"FAILED: sign val accuracy {val['sign']:.3f} < {SIGN_MIN_ACCURACY}")


if __name__ == "__main__":
    main()
