"""Synthetic per-step statistics (the brief's chunk format) for exporter and report tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distbackprop.metrics.health import PHASES, StepStats, grad_health

LAYERS = ["dense0", "dense1", "dense2"]


def synthetic_chunk(start_step: int, k: int, layer_norms: Sequence[float],
                    rng: np.random.Generator, *, layers: Sequence[str] = LAYERS,
                    samples: int = 64, nonfinite_steps: Sequence[int] = (),
                    skipped_steps: Sequence[int] = (), lr: float = 1e-3) -> dict:
    """K steps whose layer ℓ has gradient norm ``layer_norms[ℓ]`` (exactly, computed
    by `grad_health` from a real flat buffer), step numbers from `start_step`.
    Steps in `nonfinite_steps` (relative index) get a NaN in the last layer."""
    sizes = [5 + 3 * i for i in range(len(layers))]
    bounds = np.cumsum([0, *sizes])
    slices = {x: slice(int(a), int(b)) for x, a, b in zip(layers, bounds[:-1], bounds[1:],
                                                          strict=True)}
    stats = StepStats(k, layers)
    for j in range(k):
        g = np.empty(int(bounds[-1]))
        for (_, sl), n in zip(slices.items(), layer_norms, strict=True):
            v = rng.standard_normal(sl.stop - sl.start)
            g[sl] = v * (n / np.linalg.norm(v))
        if j in nonfinite_steps:
            g[-1] = np.nan
        phase = rng.uniform(1e-4, 2e-3, len(PHASES))
        stats.record(step=start_step + j, epoch=(start_step + j) // 100, loss=1.0 / (1 + j),
                     samples=samples, lr=lr, health=grad_health(g, slices),
                     update_ratio=np.full(len(layers), 1e-3) * (1 + 0.1 * j),
                     skipped=j in skipped_steps, step_seconds=float(phase.sum()) + 1e-4,
                     phase_seconds=phase)
    return stats.as_dict()


def tiny_training_run(run_dir, *, activation: str = "sigmoid", depth: int = 12,
                      steps: int = 120, lr: float = 0.5, chunk: int = 20,
                      init_scale: float = 1.0, config: dict | None = None) -> None:
    """A real (single-process, SGD) MLP run that writes history.parquet, memory.parquet
    and config.yaml into `run_dir` the way the coordinator does, chunk by chunk."""
    import time
    from pathlib import Path

    import yaml

    from distbackprop.metrics.health import update_ratios
    from distbackprop.metrics.history import HistoryWriter, MemoryHistory
    from distbackprop.metrics.memory import process_memory
    from distbackprop.nn import MLP

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0)
    model = MLP([16] + [32] * (depth - 1) + [4], activation=activation, seed=0,
                init_scale=init_scale)
    slices = model.layer_slices()
    history = HistoryWriter(model.layer_names)
    memory = MemoryHistory()
    stats = StepStats(chunk, model.layer_names)
    delta = np.empty_like(model.params)
    model.forward(x[:64])
    act_bytes = model.activation_bytes()     # what one batch keeps for backward
    for step in range(steps):
        t0 = time.perf_counter()
        idx = rng.integers(0, len(x), 64)
        xb, yb = x[idx], y[idx]
        t1 = time.perf_counter()
        loss = model.loss_and_grad(xb, yb, loss="cross_entropy")
        t2 = time.perf_counter()
        h = grad_health(model.grads, slices)
        skipped = h["nonfinite"] > 0
        np.multiply(model.grads, -lr, out=delta)
        ratio = None if skipped else update_ratios(delta, model.params, slices)
        if not skipped:
            np.add(model.params, delta, out=model.params)
        t3 = time.perf_counter()
        stats.record(step=step, epoch=step // 8, loss=loss, samples=64, lr=lr, health=h,
                     update_ratio=ratio, skipped=skipped, step_seconds=t3 - t0,
                     phase_seconds=[t1 - t0, (t2 - t1) / 2, (t2 - t1) / 2, 0.0, t3 - t2])
        if len(stats) == chunk or step == steps - 1:
            history.append(stats.as_dict())
            mem = process_memory()
            memory.append(step, {w: {**mem, "activation_bytes": act_bytes}
                                 for w in range(2)})
            stats.reset()
    history.write(run_dir / "history.parquet")
    memory.write(run_dir / "memory.parquet")
    cfg = {"activation": activation, "vanish_threshold": 1e-7, "explode_threshold": 1e3}
    cfg.update(config or {})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
