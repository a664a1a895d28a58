"""deploy/prometheus and deploy/grafana against the real tools.

A real Prometheus (Debian's package) scrapes a running MetricsExporter fed with
synthetic chunks in a background thread, with the repo's config and alert rules;
every layer's gradient norm and every worker's RSS are read back through the
HTTP API, and every dashboard panel's expression is evaluated against that data.
promtool checks the config and rules and runs the alert unit tests.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from distbackprop.metrics.exporter import MetricsExporter
from tests.conftest import require_tool
from tests.metrics.promserver import DEPLOY_PROMETHEUS, REPO, PrometheusServer, render_config
from tests.metrics.synth import LAYERS, synthetic_chunk

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "distbackprop.json"
# Fixed per-layer norms, so values read back from Prometheus can be compared exactly:
# dense1 vanishes on every step, dense2 explodes.
NORMS = [0.25, 1e-9, 5e3]
WORKERS = {0: {"rss_bytes": 111_000_000, "activation_bytes": 1_000,
               "peak_rss_bytes": 150_000_000},
           1: {"rss_bytes": 222_000_000, "activation_bytes": 2_000,
               "peak_rss_bytes": 250_000_000}}
# An RNN's per-time-bucket gradient norms (the dashboard's time panel needs a series).
TIME_BUCKETS = ["t1-5", "t6-10", "t11-15", "t16-20"]
TIME_NORMS = [1e-4, 1e-3, 1e-2, 0.1]
# What Grafana substitutes for $__rate_interval at a 1 s scrape interval is ≥ 4 s.
RATE_INTERVAL = "5s"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    tool = require_tool("promtool")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120,
                          cwd=DEPLOY_PROMETHEUS)


# ------------------------------------------------------------------ promtool
def test_promtool_check_config():
    out = _promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules():
    out = _promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "9 rules found" in out.stdout


def test_promtool_test_rules_cover_every_alert_firing_and_not():
    out = _promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    rules = yaml.safe_load((DEPLOY_PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"GradientExploding", "GradientVanishing", "NonFiniteGradients",
                      "StepsSkipped", "WorkerMemoryHigh", "TrainingStalled", "WorkerRestarts",
                      "RunBelowMaxWorkers", "GradientVanishingOverTime"}
    tests = yaml.safe_load((DEPLOY_PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fires, silent = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fires == alerts, alerts - fires
    assert silent == alerts, alerts - silent


# ------------------------------------------------------------------ dashboard JSON
def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panel_targets(dash: dict):
    for p in dash["panels"]:
        for t in p.get("targets", []):
            yield p, t


def test_dashboard_structure():
    dash = _dashboard()
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                        .read_text())["datasources"]
    uids = {d["uid"] for d in ds if d["type"] == "prometheus"}
    assert len(uids) == 1
    uid = uids.pop()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        gp = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(gp) and 0 <= gp["x"] and gp["x"] + gp["w"] <= 24
        assert p["type"] in ("timeseries", "stat", "row"), p["type"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == uid
    # panels must not overlap on the grid
    cells = set()
    for p in dash["panels"]:
        gp = p["gridPos"]
        for x in range(gp["x"], gp["x"] + gp["w"]):
            for y in range(gp["y"], gp["y"] + gp["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {(x, y)}"
                cells.add((x, y))
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")
                          .read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"


def test_dashboard_covers_what_users_need():
    dash = _dashboard()
    by_title = {p["title"]: p for p in dash["panels"]}
    exprs = " ".join(t["expr"] for _, t in _panel_targets(dash))
    for name in ("distbackprop_loss", "distbackprop_samples_per_second",
                 "distbackprop_grad_norm", "distbackprop_update_ratio",
                 "distbackprop_steps_skipped_total", "distbackprop_grad_nonfinite_total",
                 "distbackprop_worker_rss_bytes", "distbackprop_activation_bytes",
                 "distbackprop_step_phase_seconds_bucket", "distbackprop_grad_vanishing_total",
                 "distbackprop_grad_exploding_total"):
        assert name in exprs, name
    grad = next(p for t, p in by_title.items() if t.startswith("Gradient norm per layer"))
    assert grad["fieldConfig"]["defaults"]["custom"]["scaleDistribution"]["type"] == "log"
    grad_exprs = [t["expr"] for t in grad["targets"]]
    assert "distbackprop_grad_vanish_threshold" in grad_exprs
    assert "distbackprop_grad_explode_threshold" in grad_exprs
    ratio = next(p for t, p in by_title.items() if t.startswith("Update ratio"))
    assert any("0.001" in t["expr"] for t in ratio["targets"])
    assert any("histogram_quantile" in t["expr"] for _, t in _panel_targets(dash))


# ------------------------------------------------------------------ real Prometheus
class Feeder:
    """Feeds the exporter a chunk of synthetic steps every 0.2 s until stopped."""

    def __init__(self, exporter: MetricsExporter):
        self.exporter = exporter
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        step = 0
        try:
            while not self.stop_event.is_set():
                chunk = synthetic_chunk(step, 10, NORMS, rng, nonfinite_steps=[3]
                                        if step % 100 == 0 else [], skipped_steps=[3]
                                        if step % 100 == 0 else [])
                chunk["time_grad_norm"] = np.tile(TIME_NORMS, (len(chunk["step"]), 1))
                self.exporter.record_chunk(chunk, 1e-7, 1e3)
                self.exporter.record_workers(WORKERS)
                step += 10
                self.stop_event.wait(0.2)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    binary = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prom")
    exporter = MetricsExporter(LAYERS, registry=CollectorRegistry(), port=0,
                               time_buckets=TIME_BUCKETS)
    exporter.start()
    exporter.set_workers(len(WORKERS))
    exporter.set_model_bytes({"params": 800, "grads": 800, "optimizer": 1600})
    try:
        with Feeder(exporter) as feeder:
            cfg = render_config(tmp, targets=[f"127.0.0.1:{exporter.port}"])
            with PrometheusServer(binary, cfg, tmp / "tsdb") as prom:
                prom.wait_target_up("distbackprop", timeout=60)
                # rate windows need several scrapes
                prom.wait_for(f"rate(distbackprop_steps_total[{RATE_INTERVAL}]) > 0",
                              lambda r: len(r) == 1, timeout=30)
                yield prom, exporter, feeder
            assert feeder.error is None, feeder.error
    finally:
        exporter.stop()


def test_prometheus_reads_every_layer_and_worker(live):
    prom, exporter, _ = live
    grad = prom.query("distbackprop_grad_norm")
    got = {r["metric"]["layer"]: float(r["value"][1]) for r in grad}
    assert set(got) == set(LAYERS)
    for layer, norm in zip(LAYERS, NORMS, strict=True):
        assert got[layer] == pytest.approx(norm, rel=1e-9)
    assert all(r["metric"]["job"] == "distbackprop" for r in grad)
    rss = prom.query("distbackprop_worker_rss_bytes")
    got = {r["metric"]["worker"]: float(r["value"][1]) for r in rss}
    assert got == {str(w): float(m["rss_bytes"]) for w, m in WORKERS.items()}
    # the detectors' counters moved for the vanishing and exploding layers only
    moved = prom.query(f"increase(distbackprop_grad_vanishing_total[{RATE_INTERVAL}]) > 0")
    assert {r["metric"]["layer"] for r in moved} == {"dense1"}
    moved = prom.query(f"increase(distbackprop_grad_exploding_total[{RATE_INTERVAL}]) > 0")
    assert {r["metric"]["layer"] for r in moved} == {"dense2"}


def test_every_dashboard_expression_evaluates_with_data(live):
    prom, _, _ = live
    empty = []
    for panel, target in _panel_targets(_dashboard()):
        expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
        result = prom.query(expr)        # raises on a query error
        if not result:
            empty.append((panel["title"], expr))
    assert not empty, f"panels without data: {empty}"


def test_alert_rules_load_and_evaluate_cleanly(live):
    prom, _, _ = live
    deadline = time.monotonic() + 20
    while True:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        if rules and all(r.get("health") != "unknown" for r in rules):
            break
        assert time.monotonic() < deadline, f"rules never evaluated: {rules}"
        time.sleep(0.5)
    assert {r["name"] for r in rules} == {"GradientExploding", "GradientVanishing",
                                          "NonFiniteGradients", "StepsSkipped",
                                          "WorkerMemoryHigh", "TrainingStalled",
                                          "WorkerRestarts", "RunBelowMaxWorkers",
                                          "GradientVanishingOverTime"}
    bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") != "ok"]
    assert not bad, bad
    # exploding dense2 turns the alert pending (its hold is 1 minute) once the rule
    # has seen two samples of the counter
    alerts = prom.wait_for('ALERTS{alertname="GradientExploding"}', lambda r: len(r) > 0,
                           timeout=20)
    assert {a["metric"]["layer"] for a in alerts} == {"dense2"}


def test_render_config_keeps_the_repo_config(tmp_path):
    cfg = yaml.safe_load(render_config(tmp_path, ["127.0.0.1:1234"]).read_text())
    repo = yaml.safe_load((DEPLOY_PROMETHEUS / "prometheus.yml").read_text())
    assert [j["job_name"] for j in cfg["scrape_configs"]] == \
        [j["job_name"] for j in repo["scrape_configs"]]
    assert Path(cfg["rule_files"][0]).is_absolute()
    assert repo["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
