"""A real Prometheus scraping a real 2-worker training run, through the repo's config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import require_tool
from tests.metrics.promserver import PrometheusServer, free_port, render_config
from tests.metrics.test_prometheus import RATE_INTERVAL, _dashboard, _panel_targets

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_prometheus_scrapes_a_running_training(tmp_path):
    binary = require_tool("prometheus")
    port = free_port()
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "distbackprop", "train", "--workers", "2", "--hidden", "16,16",
         "--epochs", "200", "--chunk-steps", "20", "--metrics-port", str(port),
         "--metrics-linger", "120", "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        cfg = render_config(tmp_path / "prom", targets=[f"127.0.0.1:{port}"])
        with PrometheusServer(binary, cfg, tmp_path / "tsdb") as prom:
            prom.wait_target_up("distbackprop", timeout=90)
            # the gauges exist from the start; wait for the first chunk's values
            grad = prom.wait_for("distbackprop_grad_norm > 0", lambda r: len(r) == 3,
                                 timeout=90)
            assert {r["metric"]["layer"] for r in grad} == {"dense0", "dense1", "dense2"}
            rss = prom.wait_for("distbackprop_worker_rss_bytes", lambda r: len(r) == 2,
                                timeout=60)
            assert {r["metric"]["worker"] for r in rss} == {"0", "1"}
            assert all(float(r["value"][1]) > 10e6 for r in rss)
            act = prom.query("distbackprop_activation_bytes")
            assert {r["metric"]["worker"] for r in act} == {"0", "1"}
            prom.wait_for(f"rate(distbackprop_steps_total[{RATE_INTERVAL}]) > 0",
                          lambda r: len(r) == 1, timeout=60)
            empty = []
            for panel, target in _panel_targets(_dashboard()):
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                if not prom.query(expr):
                    empty.append((panel["title"], expr))
            # panels that show only non-zero events may be empty on a healthy run
            allowed = {"non-finite", "skipped", "restart", "vanish", "explod", "rnn"}
            unexpected = [e for e in empty if not any(a in e[0].lower() or a in e[1]
                                                      for a in allowed)]
            assert not unexpected, unexpected
            # Let training finish by itself: summary.json is written (atomically) before the
            # --metrics-linger wait, which the SIGINT below then cuts short.
            deadline = time.monotonic() + 600
            while not (out / "summary.json").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "training did not finish within 600 s"
                time.sleep(0.5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate(timeout=30)
    # Interrupted while lingering: exit status 130, after every run file was written.
    assert proc.returncode == 130, (proc.returncode, stderr)
    summary = json.loads((out / "summary.json").read_text())
    history = pq.read_table(out / "history.parquet")
    assert summary["workers"] == 2 and summary["restarts"] == 0
    assert summary["epochs"] == 200 and summary["steps"] == history.num_rows > 0
    assert history.column("step").to_pylist() == list(range(summary["steps"]))
    # 0.97 measured for this model in one process; chance is 0.1
    assert summary["val_accuracy"] >= 0.9, summary
