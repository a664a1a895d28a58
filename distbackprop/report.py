"""`distbackprop report DIR`: PNG plots of a finished (or running) run, under DIR/report/.

Reads DIR/history.parquet (one row per step), DIR/config.yaml (the thresholds,
``vanish_threshold``/``explode_threshold``) and, when present, DIR/memory.parquet.
Writes:

* ``loss.png`` — training loss per step (skipped steps marked);
* ``grad_norm_heatmap.png`` — log10 ‖g_ℓ‖ over steps, layers on y; cells below the
  vanish threshold and above the explode threshold take their own colours, so a
  vanishing or exploding layer shows at a glance; non-finite cells are magenta;
* ``grad_norms.png`` — per-layer gradient norms over steps, log scale, with both
  thresholds drawn;
* ``update_ratios.png`` — ‖Δθ_ℓ‖/‖θ_ℓ‖ per layer, log scale, with the 1e-3 reference;
* ``phase_times.png`` — time per step in each phase;
* ``memory.png`` — RSS and activation bytes per worker (only with memory.parquet).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import read_yaml_mapping
from .errors import ConfigError
from .metrics.health import PHASES

DEFAULT_VANISH = 1e-7
DEFAULT_EXPLODE = 1e3
UPDATE_RATIO_REFERENCE = 1e-3
REQUIRED_COLUMNS = ("step", "loss")


def _thresholds(run_dir: Path) -> tuple[float, float]:
    path = run_dir / "config.yaml"
    if not path.exists():
        return DEFAULT_VANISH, DEFAULT_EXPLODE
    cfg = read_yaml_mapping(path)
    out = []
    for key, default in (("vanish_threshold", DEFAULT_VANISH),
                         ("explode_threshold", DEFAULT_EXPLODE)):
        v = cfg.get(key, default)
        try:
            out.append(float(default if v is None else v))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {key}: expected a number, got {v!r}") from exc
    return out[0], out[1]


def _read(path: Path) -> dict[str, np.ndarray]:
    from .metrics.history import read_columns

    try:
        return read_columns(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"{path}: cannot read as Parquet: {exc}") from exc


def _layers(cols: dict[str, np.ndarray], prefix: str) -> list[str]:
    return [c[len(prefix):] for c in cols if c.startswith(prefix)]


def _layer_colors(plt, n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _legend(ax, n: int) -> None:
    # Many layers: put the legend outside so it does not hide the curves.
    if n > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        ax.legend(fontsize="small")


def _byte_unit(values: np.ndarray) -> tuple[float, str]:
    """Divisor and name of the binary unit that keeps the largest value readable."""
    top = float(np.max(values)) if len(values) else 0.0
    for div, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if top >= div:
            return float(div), name
    return 1.0, "bytes"


def _positive(a: np.ndarray) -> np.ndarray:
    """Values a log axis can show; others (0, negative, non-finite) become gaps."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def make_report(run_dir: str | Path) -> list[Path]:
    """Draw the run's plots into ``run_dir/report/``; returns the PNG paths written.

    Raises `ConfigError` naming the file or column when the history is missing or
    unreadable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    hist_path = run_dir / "history.parquet"
    if not hist_path.exists():
        raise ConfigError(f"{hist_path}: not found (is {run_dir} a run directory?)")
    cols = _read(hist_path)
    for c in REQUIRED_COLUMNS:
        if c not in cols:
            raise ConfigError(f"{hist_path}: missing column {c!r}")
    vanish, explode = _thresholds(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = np.asarray(cols["step"])
    if steps.size == 0:
        raise ConfigError(f"{hist_path}: no rows (the run recorded no steps)")
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    _plot_loss(plt, save, steps, cols)
    layers = _layers(cols, "grad_norm/")
    if layers:
        norms = np.stack([np.asarray(cols[f"grad_norm/{x}"], dtype=np.float64) for x in layers])
        _plot_grad_heatmap(plt, save, steps, layers, norms, vanish, explode)
        _plot_grad_norms(plt, save, steps, layers, norms, vanish, explode)
    ratio_layers = _layers(cols, "update_ratio/")
    if ratio_layers:
        _plot_update_ratios(plt, save, steps, cols, ratio_layers)
    phases = [p for p in PHASES if f"time/{p}" in cols]
    if phases:
        _plot_phases(plt, save, steps, cols, phases)
    buckets = _layers(cols, "time_grad_norm/")
    if buckets:  # --model rnn
        _plot_time_heatmap(plt, save, steps, buckets,
                           np.stack([np.asarray(cols[f"time_grad_norm/{b}"], dtype=np.float64)
                                     for b in buckets]))
    mem_path = run_dir / "memory.parquet"
    if mem_path.exists():
        _plot_memory(plt, save, mem_path)
    return written


def _plot_time_heatmap(plt, save, steps, buckets: list[str], norms: np.ndarray) -> None:
    """log10 ‖∂L/∂h_t‖ per time bucket (y, earliest steps on top) and training step (x).

    `norms` (buckets, K): each bucket's RMS of ‖∂L/∂h_t‖ over its time steps. A column that
    darkens from the bottom (late t) to the top (early t) is the gradient vanishing back
    through time. Exact zeros (truncated BPTT cut the graph) are drawn as gaps.
    """
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.45 * len(buckets)))
    with np.errstate(divide="ignore", invalid="ignore"):
        logn = np.log10(_positive(norms))
    data = np.ma.masked_invalid(logn)
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(buckets) - 0.5, -0.5)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", extent=extent)
    ax.set_yticks(range(len(buckets)), buckets)
    ax.set(xlabel="training step", ylabel="time steps (bucket)")
    ratio = norms[0] / np.where(norms[-1] > 0, norms[-1], np.nan)
    last = ratio[np.isfinite(ratio)]
    shown = f"   first/last bucket at the end: {last[-1]:.2e}" if last.size else ""
    ax.set_title(f"log10 ‖∂L/∂h_t‖ per time bucket{shown}", fontsize="medium")
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label("log10 ‖∂L/∂h_t‖")
    save(fig, "time_grad_heatmap.png")


def _plot_loss(plt, save, steps: np.ndarray, cols: dict) -> None:
    """Training loss per step (smoothed when long), skipped steps marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    loss = np.asarray(cols["loss"], dtype=np.float64)
    ax.plot(steps, loss, lw=0.8, color="tab:blue", alpha=0.5 if loss.size > 200 else 1.0,
            label="loss per step")
    if loss.size > 200:
        w = max(loss.size // 30, 2)
        smooth = np.convolve(np.nan_to_num(loss, nan=0.0), np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.6, color="tab:blue", label=f"mean of {w} steps")
    if "skipped" in cols and np.any(cols["skipped"]):
        sk = np.asarray(cols["skipped"], dtype=bool)
        lim = np.nanmax(np.where(np.isfinite(loss), loss, np.nan)) if np.isfinite(loss).any() \
            else 1.0
        ax.plot(steps[sk], np.full(int(sk.sum()), lim), "x", color="tab:red",
                label="skipped step")
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    if np.all(loss[np.isfinite(loss)] > 0) and np.isfinite(loss).any():
        finite = loss[np.isfinite(loss)]
        if finite.max() / finite.min() > 100:
            ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save(fig, "loss.png")


def _plot_grad_heatmap(plt, save, steps, layers, norms, vanish: float, explode: float) -> None:
    """log10 ‖g‖ per layer (y) and step (x); the three failure states in saturated colours."""
    lo, hi = np.log10(vanish) if vanish > 0 else -12.0, np.log10(explode)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * len(layers)))
    with np.errstate(divide="ignore", invalid="ignore"):
        logn = np.log10(norms)
    # A calm sequential map for the healthy band; the three failure states get
    # saturated colours that appear nowhere inside it.
    cmap = plt.get_cmap("YlGn").with_extremes(
        under="#1f3fff",   # vanishing
        over="#e41a1c",    # exploding
        bad="#ff00ff",     # non-finite
    )
    data = np.ma.masked_invalid(logn)
    data = np.ma.where(np.isneginf(logn), lo - 1.0, data)   # exact zero: vanished
    data = np.ma.where(np.isposinf(logn), hi + 1.0, data)   # overflowed norm: exploded
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(layers) - 0.5, -0.5)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi,
                   extent=extent)
    ax.set_yticks(range(len(layers)), layers)
    ax.set(xlabel="step", ylabel="layer")
    ax.set_title(f"log10 gradient norm per layer\nblue: vanishing (< {vanish:g})   "
                 f"red: exploding (> {explode:g})   magenta: non-finite", fontsize="medium")
    cb = fig.colorbar(im, ax=ax, extend="both", pad=0.01)
    cb.set_label("log10 ‖g‖")
    save(fig, "grad_norm_heatmap.png")


def _plot_grad_norms(plt, save, steps, layers, norms, vanish: float, explode: float) -> None:
    """Per-layer gradient norms on a log scale, with the two thresholds drawn."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for x, c, n in zip(layers, _layer_colors(plt, len(layers)), norms, strict=True):
        ax.plot(steps, _positive(n), lw=1.0, color=c, label=x)
    ax.axhline(explode, color="tab:red", ls="--", lw=1.5,
               label=f"explode threshold {explode:g}")
    if vanish > 0:
        ax.axhline(vanish, color="tab:blue", ls="--", lw=1.5,
                   label=f"vanish threshold {vanish:g}")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="‖g‖ (L2, W and b)", title="Gradient norm per layer")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(layers) + 2)
    save(fig, "grad_norms.png")


def _plot_update_ratios(plt, save, steps, cols: dict, layers: list[str]) -> None:
    """‖Δθ‖/‖θ‖ per layer on a log scale."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for x, c in zip(layers, _layer_colors(plt, len(layers)), strict=True):
        ax.plot(steps, _positive(cols[f"update_ratio/{x}"]), lw=1.0, color=c, label=x)
    ax.axhline(UPDATE_RATIO_REFERENCE, color="tab:orange", ls="--", lw=1.5,
               label=f"reference {UPDATE_RATIO_REFERENCE:g}")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="‖Δθ‖ / ‖θ‖", title="Update ratio per layer")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(layers) + 1)
    save(fig, "update_ratios.png")


def _plot_phases(plt, save, steps, cols: dict, phases: list[str]) -> None:
    """Milliseconds per step, stacked by phase."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ys = [np.nan_to_num(np.asarray(cols[f"time/{p}"], dtype=np.float64)) * 1e3
          for p in phases]
    ax.stackplot(steps, *ys, labels=phases, alpha=0.85)
    ax.set(xlabel="step", ylabel="ms per step", title="Time per step by phase")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")
    save(fig, "phase_times.png")


def _plot_memory(plt, save, mem_path: Path) -> None:
    """Resident memory and activation bytes per worker over steps."""
    mem = _read(mem_path)
    for c in ("step", "worker", "rss_bytes", "activation_bytes"):
        if c not in mem:
            raise ConfigError(f"{mem_path}: missing column {c!r}")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    workers = np.unique(mem["worker"])
    rss_div, rss_unit = _byte_unit(mem["rss_bytes"])
    act_div, act_unit = _byte_unit(mem["activation_bytes"])
    for w, c in zip(workers, _layer_colors(plt, len(workers)), strict=True):
        sel = mem["worker"] == w
        ax1.plot(mem["step"][sel], mem["rss_bytes"][sel] / rss_div, color=c, marker=".",
                 label=f"worker {w} RSS")
        if "peak_rss_bytes" in mem:
            ax1.plot(mem["step"][sel], mem["peak_rss_bytes"][sel] / rss_div, color=c,
                     ls=":", label=f"worker {w} peak")
        ax2.plot(mem["step"][sel], mem["activation_bytes"][sel] / act_div, color=c,
                 marker=".", label=f"worker {w}")
    ax1.set(ylabel=rss_unit, title="Resident memory per worker")
    ax2.set(xlabel="step", ylabel=act_unit,
            title="Activations held for backward per worker")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        _legend(ax, 2 * len(workers))
    save(fig, "memory.png")


__all__ = ["make_report"]
