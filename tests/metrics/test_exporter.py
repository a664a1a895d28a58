"""MetricsExporter: contract names, values read back with get_sample_value, bounded series,
the HTTP server's life cycle, and prometheus_client's single home."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from distbackprop.config import TrainConfig
from distbackprop.metrics.exporter import PHASE_BUCKETS, MetricsExporter
from distbackprop.metrics.health import PHASES
from tests.metrics.promserver import free_port
from tests.metrics.synth import LAYERS, synthetic_chunk

CONTRACT = {  # the README's metrics table: name → (type, labels)
    "distbackprop_steps_total": ("counter", ()),
    "distbackprop_samples_total": ("counter", ()),
    "distbackprop_loss": ("gauge", ()),
    "distbackprop_grad_global_norm": ("gauge", ()),
    "distbackprop_grad_norm": ("gauge", ("layer",)),
    "distbackprop_update_ratio": ("gauge", ("layer",)),
    "distbackprop_grad_vanishing_total": ("counter", ("layer",)),
    "distbackprop_grad_exploding_total": ("counter", ("layer",)),
    "distbackprop_grad_nonfinite_total": ("counter", ()),
    "distbackprop_steps_skipped_total": ("counter", ()),
    "distbackprop_step_phase_seconds": ("histogram", ("phase",)),
    "distbackprop_samples_per_second": ("gauge", ()),
    "distbackprop_worker_rss_bytes": ("gauge", ("worker",)),
    "distbackprop_activation_bytes": ("gauge", ("worker",)),
    "distbackprop_model_bytes": ("gauge", ("kind",)),
    "distbackprop_workers": ("gauge", ()),
    "distbackprop_worker_restarts_total": ("counter", ("reason",)),
}


def _exporter():
    reg = CollectorRegistry()
    return MetricsExporter(LAYERS, registry=reg, port=0), reg


def test_every_contract_metric_with_its_type_and_labels():
    exp, reg = _exporter()
    exp.record_workers({0: {"rss_bytes": 1, "activation_bytes": 2}})
    families = {}
    for fam in reg.collect():
        # prometheus_client names a counter family without its _total suffix
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        families[name] = fam
    for name, (typ, labels) in CONTRACT.items():
        assert name in families, f"{name} missing"
        fam = families[name]
        assert fam.type == typ, (name, fam.type)
        sample_names = {name + "_bucket", name + "_count", name + "_sum"} if typ == "histogram" \
            else {name}
        for s in fam.samples:
            if s.name in sample_names:
                got = tuple(k for k in s.labels if k != "le")
                assert got == labels, (name, s.labels)
    # layer and phase series exist from the start (at 0), for increase() and alerts
    for layer in LAYERS:
        assert reg.get_sample_value("distbackprop_grad_vanishing_total", {"layer": layer}) == 0
    for p in PHASES:
        assert reg.get_sample_value("distbackprop_step_phase_seconds_count", {"phase": p}) == 0


def test_record_chunk_values():
    exp, reg = _exporter()
    rng = np.random.default_rng(0)
    # dense1 vanishes on every step, dense2 explodes; step 3 has a NaN (in dense2),
    # steps 3 and 4 are skipped
    s = synthetic_chunk(100, 10, [0.5, 1e-9, 5e3], rng, nonfinite_steps=[3],
                        skipped_steps=[3, 4])
    exp.record_chunk(s, vanish_threshold=1e-7, explode_threshold=1e3)
    g = reg.get_sample_value
    assert g("distbackprop_steps_total") == 10
    assert g("distbackprop_samples_total") == 640
    assert g("distbackprop_loss") == s["loss"][-1]
    assert g("distbackprop_grad_global_norm") == s["grad_global_norm"][-1]
    for i, layer in enumerate(LAYERS):
        assert g("distbackprop_grad_norm", {"layer": layer}) == s["grad_norm"][-1, i]
        assert g("distbackprop_update_ratio", {"layer": layer}) == s["update_ratio"][-1, i]
    assert g("distbackprop_grad_vanishing_total", {"layer": "dense0"}) == 0
    assert g("distbackprop_grad_vanishing_total", {"layer": "dense1"}) == 10
    assert g("distbackprop_grad_vanishing_total", {"layer": "dense2"}) == 0
    assert g("distbackprop_grad_exploding_total", {"layer": "dense0"}) == 0
    assert g("distbackprop_grad_exploding_total", {"layer": "dense1"}) == 0
    assert g("distbackprop_grad_exploding_total", {"layer": "dense2"}) == 10
    assert g("distbackprop_grad_nonfinite_total") == 1
    assert g("distbackprop_steps_skipped_total") == 2
    assert g("distbackprop_samples_per_second") == pytest.approx(
        640 / s["step_seconds"].sum(), rel=1e-12)
    assert g("distbackprop_step") == 109
    assert g("distbackprop_grad_vanish_threshold") == 1e-7
    assert g("distbackprop_grad_explode_threshold") == 1e3
    for j, p in enumerate(PHASES):
        v = s["phase_seconds"][:, j]
        assert g("distbackprop_step_phase_seconds_count", {"phase": p}) == 10
        assert g("distbackprop_step_phase_seconds_sum", {"phase": p}) == pytest.approx(v.sum())
        for le in (1e-4, 1e-3, 2.5e-3):
            assert le in PHASE_BUCKETS
            assert g("distbackprop_step_phase_seconds_bucket",
                     {"phase": p, "le": str(le)}) == np.count_nonzero(v <= le)

    # a second chunk adds to the counters and replaces the gauges
    s2 = synthetic_chunk(110, 5, [0.5, 0.5, 0.5], rng)
    exp.record_chunk(s2, 1e-7, 1e3, wall_seconds=2.0)
    assert g("distbackprop_steps_total") == 15
    assert g("distbackprop_grad_vanishing_total", {"layer": "dense1"}) == 10
    assert g("distbackprop_grad_norm", {"layer": "dense1"}) == pytest.approx(0.5)
    assert g("distbackprop_samples_per_second") == 5 * 64 / 2.0


def test_thresholds_decide_the_counts():
    exp, reg = _exporter()
    s = synthetic_chunk(0, 4, [1e-3, 1.0, 10.0], np.random.default_rng(1))
    exp.record_chunk(s, vanish_threshold=1e-2, explode_threshold=5.0)
    g = reg.get_sample_value
    assert g("distbackprop_grad_vanishing_total", {"layer": "dense0"}) == 4
    assert g("distbackprop_grad_exploding_total", {"layer": "dense2"}) == 4
    assert g("distbackprop_grad_vanishing_total", {"layer": "dense1"}) == 0
    assert g("distbackprop_grad_exploding_total", {"layer": "dense1"}) == 0


def test_workers_model_bytes_restarts():
    exp, reg = _exporter()
    g = reg.get_sample_value
    exp.record_workers({0: {"rss_bytes": 100, "activation_bytes": 10, "peak_rss_bytes": 150},
                        1: {"rss_bytes": 200, "activation_bytes": 20}})
    assert g("distbackprop_worker_rss_bytes", {"worker": "0"}) == 100
    assert g("distbackprop_worker_rss_bytes", {"worker": "1"}) == 200
    assert g("distbackprop_activation_bytes", {"worker": "1"}) == 20
    assert g("distbackprop_worker_peak_rss_bytes", {"worker": "0"}) == 150
    # the group shrank (recovery with fewer workers): worker 1's series go away
    exp.record_workers({0: {"rss_bytes": 120, "activation_bytes": 12}})
    assert g("distbackprop_worker_rss_bytes", {"worker": "0"}) == 120
    assert g("distbackprop_worker_rss_bytes", {"worker": "1"}) is None
    assert g("distbackprop_activation_bytes", {"worker": "1"}) is None
    exp.set_model_bytes({"params": 80, "grads": 80, "optimizer": 160})
    assert g("distbackprop_model_bytes", {"kind": "optimizer"}) == 160
    exp.set_workers(2)
    assert g("distbackprop_workers") == 2
    exp.inc_restarts()
    exp.inc_restarts(reason="node_lost")
    exp.inc_restarts(reason="node_lost")
    assert g("distbackprop_worker_restarts_total", {"reason": "death"}) == 1
    assert g("distbackprop_worker_restarts_total", {"reason": "node_lost"}) == 2
    assert g("distbackprop_worker_restarts_total", {"reason": "resize"}) == 0
    with pytest.raises(ValueError, match="reason"):
        exp.inc_restarts(reason="gremlins")


def test_series_count_does_not_grow_with_steps():
    exp, reg = _exporter()
    rng = np.random.default_rng(2)
    workers = {0: {"rss_bytes": 1, "activation_bytes": 1}, 1: {"rss_bytes": 2,
                                                                "activation_bytes": 2}}

    def run(n_steps, start):
        for k in range(start, start + n_steps, 10):
            exp.record_chunk(synthetic_chunk(k, 10, [1e-9, 1.0, 5e3], rng,
                                             nonfinite_steps=[2], skipped_steps=[2]),
                             1e-7, 1e3)
            exp.record_workers(workers)

    def series():
        return sorted((s.name, tuple(sorted(s.labels.items())))
                      for fam in reg.collect() for s in fam.samples)

    run(10, 0)
    after_10 = series()
    run(90, 10)
    assert reg.get_sample_value("distbackprop_steps_total") == 100
    assert series() == after_10
    assert exp.series_count() == len(after_10)


def test_disabled_exporter_records_and_serves_nothing():
    cfg = TrainConfig(metrics_port=0)
    reg = CollectorRegistry()
    exp = MetricsExporter.from_config(cfg, LAYERS, registry=reg)
    assert not exp.enabled
    assert exp.start() is None and exp.url is None
    exp.record_chunk(synthetic_chunk(0, 3, [1, 1, 1], np.random.default_rng(0)), 1e-7, 1e3)
    exp.set_workers(3)
    assert reg.get_sample_value("distbackprop_steps_total") == 0
    assert reg.get_sample_value("distbackprop_workers") == 0
    exp.stop()
    on = MetricsExporter.from_config(TrainConfig(metrics_port=9555, metrics_host="127.0.0.2"),
                                     LAYERS)
    assert on.enabled and on.port == 9555 and on.host == "127.0.0.2"


def test_http_server_serves_and_stops():
    exp, reg = _exporter()
    assert exp.host == "127.0.0.1"
    port = exp.start()
    try:
        assert port and port == exp.port
        assert exp.start() == port          # idempotent
        exp.record_chunk(synthetic_chunk(0, 5, [0.1, 0.2, 0.3], np.random.default_rng(0)),
                         1e-7, 1e3)
        body = urllib.request.urlopen(exp.url, timeout=5).read().decode()
        assert 'distbackprop_grad_norm{layer="dense2"} 0.3' in body
        assert "distbackprop_steps_total 5.0" in body
        thread = exp._thread
    finally:
        exp.stop()
    assert not thread.is_alive()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    exp.stop()   # twice is fine


def test_prometheus_client_imported_only_by_the_exporter():
    code = ("import sys, distbackprop.metrics, distbackprop.metrics.health, "
            "distbackprop.metrics.memory, distbackprop.metrics.history, distbackprop.report; "
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_phase_histogram_bucket_rule_matches_prometheus_client():
    """Our vectorised histogram against prometheus_client's own Histogram, value by value
    (including values exactly on a bucket bound: v ≤ le counts)."""
    from prometheus_client import Histogram

    from distbackprop.metrics.exporter import PhaseHistogram

    rng = np.random.default_rng(3)
    seconds = 10 ** rng.uniform(-6, 1.5, size=(200, len(PHASES)))
    seconds[:10] = np.array(PHASE_BUCKETS[:10])[:, None]          # exactly on bounds
    ours_reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    ours = PhaseHistogram()
    ours_reg.register(ours)
    ref = Histogram("distbackprop_step_phase_seconds", "ref", ["phase"],
                    buckets=PHASE_BUCKETS, registry=ref_reg)
    ours.observe_many(seconds[:150])
    ours.observe_many(seconds[150:])
    for j, p in enumerate(PHASES):
        for v in seconds[:, j]:
            ref.labels(phase=p).observe(v)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in ours_reg.collect() for s in f.samples}
    want = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in ref_reg.collect() for s in f.samples if not s.name.endswith("_created")}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k


_LINGER_PROBE = """
import signal, sys, threading, time
from distbackprop.metrics.exporter import MetricsExporter
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
exp = MetricsExporter(["dense0"], port=int(sys.argv[1]))
exp.start()
def hand_sigint_to_this_thread():
    time.sleep(0.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
threading.Thread(target=hand_sigint_to_this_thread, daemon=True).start()
t = time.monotonic()
try:
    exp.stop(linger=60)
    print("lingered", round(time.monotonic() - t, 1))
except KeyboardInterrupt:
    print("interrupted", round(time.monotonic() - t, 1))
"""


def test_linger_ends_on_a_signal_another_thread_received() -> None:
    """--metrics-linger sleeps on the main thread; the kernel may hand a process's SIGINT
    to any thread. Python then runs the handler on the main thread only when its sleep
    returns, so the linger sleeps in short slices (a whole `time.sleep(linger)` once
    kept a SIGINTed run alive past a 60 s wait)."""
    r = subprocess.run([sys.executable, "-c", _LINGER_PROBE, str(free_port())],
                       capture_output=True, text=True, timeout=120, check=True)
    word, seconds = r.stdout.split()
    assert word == "interrupted", r.stdout
    assert float(seconds) < 5, r.stdout
