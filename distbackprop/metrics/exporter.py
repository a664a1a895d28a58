"""Prometheus exporter for the coordinator (the only prometheus_client importer).

Every metric of the README's table lives in the exporter's own
`CollectorRegistry` (no global state); tests read values with
``registry.get_sample_value``. Fed once per chunk from the per-step statistics
the workers return (`record_chunk`), so the cost is per chunk, not per step
(the phase histogram folds a chunk in with one vectorised pass; measured
~0.35 µs per step for K=100, 3 layers). Labels are layer names,
worker ranks and phases only: the number of series is fixed by the model and
the worker count, never by the number of steps.

Beyond the contract (extensions, never renames): ``distbackprop_step`` and
``distbackprop_epoch`` (last step), ``distbackprop_lr``,
``distbackprop_grad_max_abs``, ``distbackprop_grad_vanish_threshold`` and
``distbackprop_grad_explode_threshold`` (so dashboards draw the run's own
thresholds) and ``distbackprop_worker_peak_rss_bytes{worker}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .health import PHASES, classify

# Phase times span ~10 µs (update of a tiny model) to seconds (data loading from
# a slow disk); a 1-2.5-5 ladder keeps quantiles within a factor ~2.5.
PHASE_BUCKETS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
MODEL_KINDS: tuple[str, ...] = ("params", "grads", "optimizer")


RESTART_REASONS = ("death", "hang", "node_lost", "resize")


class PhaseHistogram(Collector):
    """``distbackprop_step_phase_seconds{phase}`` with its bucket counts kept in NumPy.

    A chunk of K steps is folded in with one ``searchsorted`` instead of 5·K
    ``Histogram.observe`` calls (~1.5 µs each), which would cost more than the
    health statistics themselves. Exposition is the standard histogram
    (cumulative ``_bucket{le}``, ``_sum``, ``_count``).
    """

    NAME = "distbackprop_step_phase_seconds"

    def __init__(self, buckets: Sequence[float] = PHASE_BUCKETS,
                 phases: Sequence[str] = PHASES):
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.phases = list(phases)
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        # per phase, per bucket (non-cumulative; last is above the largest bound)
        self._counts = np.zeros((len(self.phases), len(self.bounds) + 1), dtype=np.int64)
        self._sums = np.zeros(len(self.phases), dtype=np.float64)
        self._lock = threading.Lock()

    def observe_many(self, seconds: np.ndarray) -> None:
        """Add K steps' phase times, shape (K, len(phases)); prometheus' rule: v ≤ le."""
        seconds = np.asarray(seconds, dtype=np.float64)
        idx = np.searchsorted(self.bounds, seconds, side="left")
        n_b = len(self.bounds) + 1
        # one bincount over (phase, bucket) pairs
        flat = (np.arange(len(self.phases)) * n_b + idx).ravel()
        add = np.bincount(flat, minlength=len(self.phases) * n_b).reshape(len(self.phases), n_b)
        with self._lock:
            self._counts += add
            self._sums += seconds.sum(axis=0)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.NAME, "Time per step in each phase", labels=["phase"])

    def describe(self):
        return [self._family()]

    def collect(self):
        with self._lock:
            cum = np.cumsum(self._counts, axis=1)
            sums = self._sums.copy()
        fam = self._family()
        for j, phase in enumerate(self.phases):
            fam.add_metric([phase], list(zip(self._le, cum[j].astype(float).tolist(),
                                             strict=True)), sum_value=float(sums[j]))
        yield fam


class MetricsExporter:
    """All distbackprop metrics in one registry, optionally served over HTTP.

    `layers`: layer names (``model.layer_names``), the ``layer`` label values.
    `port`: TCP port for `start`; 0 binds an ephemeral port (tests), read it back
    from `port` after `start`. `enabled=False` makes every method a no-op and
    `start` serve nothing — that is how ``--metrics-port 0`` ("off") maps here;
    see `from_config`.
    """

    def __init__(self, layers: Sequence[str], registry: CollectorRegistry | None = None,
                 host: str = "127.0.0.1", port: int = 9400, enabled: bool = True,
                 time_buckets: Sequence[str] = ()):
        self.layers = [str(x) for x in layers]
        self.registry = registry if registry is not None else CollectorRegistry()
        self.host = host
        self.port = int(port)
        self.enabled = bool(enabled)
        self._server = None
        self._thread: threading.Thread | None = None
        self._workers_seen: set[str] = set()
        r = self.registry

        self.steps = Counter("distbackprop_steps_total", "Training steps completed "
                             "(skipped steps included)", registry=r)
        self.samples = Counter("distbackprop_samples_total", "Training samples processed",
                               registry=r)
        self.loss = Gauge("distbackprop_loss", "Training loss of the last step", registry=r)
        self.grad_global_norm = Gauge("distbackprop_grad_global_norm",
                                      "Global L2 norm of the reduced gradient, last step",
                                      registry=r)
        self.grad_norm = Gauge("distbackprop_grad_norm",
                               "Per-layer L2 norm of the reduced gradient (W and b), last step",
                               ["layer"], registry=r)
        self.update_ratio = Gauge("distbackprop_update_ratio",
                                  "Per-layer update ratio ||dtheta||/||theta||, last step",
                                  ["layer"], registry=r)
        self.vanishing = Counter("distbackprop_grad_vanishing_total",
                                 "Steps where the layer's gradient norm was below the "
                                 "vanish threshold", ["layer"], registry=r)
        self.exploding = Counter("distbackprop_grad_exploding_total",
                                 "Steps where the layer's gradient norm was above the explode "
                                 "threshold or non-finite", ["layer"], registry=r)
        self.nonfinite = Counter("distbackprop_grad_nonfinite_total",
                                 "Steps whose reduced gradient held a non-finite value",
                                 registry=r)
        self.skipped = Counter("distbackprop_steps_skipped_total",
                               "Steps whose update was skipped", registry=r)
        self.phase_seconds = PhaseHistogram(PHASE_BUCKETS, PHASES)
        r.register(self.phase_seconds)
        self.samples_per_second = Gauge("distbackprop_samples_per_second",
                                        "Training throughput over the last chunk", registry=r)
        self.worker_rss = Gauge("distbackprop_worker_rss_bytes",
                                "Resident set size per worker", ["worker"], registry=r)
        self.worker_peak_rss = Gauge("distbackprop_worker_peak_rss_bytes",
                                     "Peak resident set size per worker", ["worker"], registry=r)
        self.activation = Gauge("distbackprop_activation_bytes",
                                "Bytes of activations cached for backward per worker",
                                ["worker"], registry=r)
        self.model = Gauge("distbackprop_model_bytes", "Model bytes by kind", ["kind"],
                           registry=r)
        self._group_metrics(r)
        self.step = Gauge("distbackprop_step", "Last completed step", registry=r)
        self.epoch = Gauge("distbackprop_epoch", "Epoch of the last completed step", registry=r)
        self.lr = Gauge("distbackprop_lr", "Learning rate of the last step", registry=r)
        self.grad_max_abs = Gauge("distbackprop_grad_max_abs",
                                  "Largest finite |gradient| entry, last step", registry=r)
        self.sharpness = Gauge("distbackprop_sharpness",
                               "Top Hessian eigenvalue (power iteration on HVPs), last measured "
                               "(--sharpness-every)", registry=r)
        self.vanish_threshold = Gauge("distbackprop_grad_vanish_threshold",
                                      "Per-layer gradient norm below which a layer vanishes",
                                      registry=r)
        self.explode_threshold = Gauge("distbackprop_grad_explode_threshold",
                                       "Per-layer gradient norm above which a layer explodes",
                                       registry=r)

        self._time_metrics(r, time_buckets)
        # Create every labelled child now so each series exists (at 0) from the
        # first scrape: increase() and alerts need the zero before the first event.
        self._grad_norm = [self.grad_norm.labels(layer=x) for x in self.layers]
        self._update_ratio = [self.update_ratio.labels(layer=x) for x in self.layers]
        self._vanishing = [self.vanishing.labels(layer=x) for x in self.layers]
        self._exploding = [self.exploding.labels(layer=x) for x in self.layers]
        for kind in MODEL_KINDS:
            self.model.labels(kind=kind)

    def _group_metrics(self, r: CollectorRegistry) -> None:
        """The worker group: its size, the most it may have, and restarts by reason."""
        self.workers = Gauge("distbackprop_workers", "Workers in the current group", registry=r)
        self.workers_max = Gauge("distbackprop_workers_max", "The most workers the run may use "
                                 "(--workers N or the MAX of MIN:MAX)", registry=r)
        self.restarts = Counter("distbackprop_worker_restarts_total",
                                "Worker-group restarts, by reason", ["reason"], registry=r)
        for reason in RESTART_REASONS:  # every reason exported from the start, at 0
            self.restarts.labels(reason=reason)

    def _time_metrics(self, r: CollectorRegistry, time_buckets: Sequence[str]) -> None:
        """--model rnn: ‖∂L/∂h_t‖ folded into a few time buckets (labels like "t1-25"), and
        the first bucket over the last: ≪ 1 when the gradient vanishes back through time.
        Registered only for a model with time steps: an MLP run exports no ratio (a 0 there
        would read as vanishing to the alert)."""
        self.time_buckets = [str(b) for b in time_buckets]
        self._time_grad_norm: list = []
        self.time_grad_norm = self.time_grad_ratio = None
        if not self.time_buckets:
            return
        self.time_grad_norm = Gauge("distbackprop_time_grad_norm",
                                    "RMS over the bucket's time steps t of ||dL/dh_t|| (RNN), "
                                    "last step", ["bucket"], registry=r)
        self.time_grad_ratio = Gauge("distbackprop_time_grad_ratio",
                                     "First time bucket's gradient norm over the last bucket's "
                                     "(RNN), last step", registry=r)
        self._time_grad_norm = [self.time_grad_norm.labels(bucket=b) for b in self.time_buckets]

    @classmethod
    def from_config(cls, config: Any, layers: Sequence[str],
                    registry: CollectorRegistry | None = None,
                    time_buckets: Sequence[str] = ()) -> MetricsExporter:
        """Exporter for a `TrainConfig`: ``metrics_port == 0`` means off (``enabled=False``)."""
        port = int(config.metrics_port)
        return cls(layers, registry=registry, host=config.metrics_host, port=port,
                   enabled=port != 0, time_buckets=time_buckets)

    # ------------------------------------------------------------------ server
    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` while serving, else None."""
        if self._server is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> int | None:
        """Serve /metrics on host:port in a daemon thread; returns the bound port
        (None when disabled). Raises OSError if the port is taken."""
        if not self.enabled:
            return None
        if self._server is not None:
            return self.port
        self._server, self._thread = start_http_server(self.port, addr=self.host,
                                                       registry=self.registry)
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self, linger: float = 0.0) -> None:
        """Keep serving `linger` seconds (``--metrics-linger``), then shut the server
        down and join its thread. Safe to call twice."""
        if self._server is None:
            return
        end = time.monotonic() + linger
        while (left := end - time.monotonic()) > 0:
            # In slices: a signal the kernel hands to another thread (its handler runs in
            # this one) does not cut a long sleep short; a slice ends within 0.25 s.
            time.sleep(min(left, 0.25))
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> MetricsExporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- feeding
    def record_chunk(self, stats: Mapping[str, np.ndarray], vanish_threshold: float,
                     explode_threshold: float, wall_seconds: float | None = None) -> None:
        """Fold one chunk of K steps (the per-step statistics of the brief) in.

        Counters add per step (a layer counts once per step it vanishes/explodes;
        non-finite and skipped count steps); gauges take the chunk's last step; the
        phase histogram observes every step. samples_per_second = Σ samples /
        (`wall_seconds`, or Σ step_seconds when not given).
        """
        if not self.enabled:
            return
        k = int(np.asarray(stats["step"]).shape[0])
        self.vanish_threshold.set(vanish_threshold)
        self.explode_threshold.set(explode_threshold)
        if k == 0:
            return
        grad_norm = np.asarray(stats["grad_norm"], dtype=np.float64)
        if grad_norm.shape != (k, len(self.layers)):
            raise ValueError(f"stats['grad_norm']: expected shape {(k, len(self.layers))}, "
                             f"got {grad_norm.shape}")
        update_ratio = np.asarray(stats["update_ratio"], dtype=np.float64)
        vanishing, exploding = classify(grad_norm, vanish_threshold, explode_threshold)
        n_van = vanishing.sum(axis=0)
        n_exp = exploding.sum(axis=0)
        last = k - 1
        for i in range(len(self.layers)):
            if n_van[i]:
                self._vanishing[i].inc(int(n_van[i]))
            if n_exp[i]:
                self._exploding[i].inc(int(n_exp[i]))
            self._grad_norm[i].set(float(grad_norm[last, i]))
            self._update_ratio[i].set(float(update_ratio[last, i]))

        samples = np.asarray(stats["samples"])
        n_samples = int(samples.sum())
        self.steps.inc(k)
        self.samples.inc(n_samples)
        n_nonfinite = int(np.count_nonzero(np.asarray(stats["nonfinite"]) > 0))
        if n_nonfinite:
            self.nonfinite.inc(n_nonfinite)
        n_skipped = int(np.count_nonzero(stats["skipped"]))
        if n_skipped:
            self.skipped.inc(n_skipped)
        self.loss.set(float(stats["loss"][last]))
        self.grad_global_norm.set(float(stats["grad_global_norm"][last]))
        self.grad_max_abs.set(float(stats["grad_max_abs"][last]))
        self.lr.set(float(stats["lr"][last]))
        self.step.set(float(stats["step"][last]))
        self.epoch.set(float(stats["epoch"][last]))
        sharp = np.asarray(stats.get("sharpness", ()), dtype=np.float64)
        measured = sharp[np.isfinite(sharp)]
        if measured.size:
            self.sharpness.set(float(measured[-1]))

        self._record_time_norms(stats.get("time_grad_norm"))
        self.phase_seconds.observe_many(stats["phase_seconds"])
        seconds = float(wall_seconds if wall_seconds is not None
                        else np.asarray(stats["step_seconds"]).sum())
        if seconds > 0:
            self.samples_per_second.set(n_samples / seconds)

    def _record_time_norms(self, norms: np.ndarray | None) -> None:
        """Gauges of the chunk's last step: per time bucket, and first bucket / last."""
        if norms is None or self.time_grad_ratio is None or len(norms) == 0:
            return
        last = np.asarray(norms, dtype=np.float64)[-1]
        for child, v in zip(self._time_grad_norm, last, strict=True):
            child.set(float(v))
        self.time_grad_ratio.set(float(last[0] / last[-1]) if last[-1] > 0 else float("nan"))

    def record_workers(self, memory: Mapping[int, Mapping[str, int]]) -> None:
        """Per-worker memory at chunk end: {rank: {"rss_bytes", "activation_bytes",
        optional "peak_rss_bytes"}}. Ranks absent now but seen before are removed,
        so a smaller group after recovery leaves no stale series."""
        if not self.enabled:
            return
        now = set()
        for rank, m in memory.items():
            w = str(int(rank))
            now.add(w)
            self.worker_rss.labels(worker=w).set(int(m["rss_bytes"]))
            self.activation.labels(worker=w).set(int(m.get("activation_bytes", 0)))
            if "peak_rss_bytes" in m:
                self.worker_peak_rss.labels(worker=w).set(int(m["peak_rss_bytes"]))
        for w in self._workers_seen - now:
            for g in (self.worker_rss, self.activation, self.worker_peak_rss):
                try:
                    g.remove(w)
                except KeyError:
                    pass
        self._workers_seen = now

    def set_model_bytes(self, sizes: Mapping[str, int]) -> None:
        """``{"params": .., "grads": .., "optimizer": ..}`` (`memory.model_bytes`)."""
        if not self.enabled:
            return
        for kind, n in sizes.items():
            self.model.labels(kind=str(kind)).set(int(n))

    def set_workers(self, n: int) -> None:
        """Workers in the current group (0 after training ends, so TrainingStalled
        stays quiet while the exporter lingers)."""
        if self.enabled:
            self.workers.set(int(n))

    def inc_restarts(self, n: int = 1, reason: str = "death") -> None:
        """Count a worker-group restart; `reason` is one of RESTART_REASONS."""
        if reason not in RESTART_REASONS:
            raise ValueError(f"reason: {reason!r} is not one of {', '.join(RESTART_REASONS)}")
        if self.enabled:
            self.restarts.labels(reason=reason).inc(n)

    def series_count(self) -> int:
        """Number of samples the registry exposes now (tests: bounded by labels, not steps)."""
        return sum(len(m.samples) for m in self.registry.collect())


__all__ = ["RESTART_REASONS", "MODEL_KINDS", "PHASE_BUCKETS", "MetricsExporter", "PhaseHistogram"]
