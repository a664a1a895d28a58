"""A real Prometheus scrapes the per-time-bucket gradient norms of a running RNN training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import require_tool
from tests.metrics.promserver import PrometheusServer, free_port, render_config
from tests.seqdata import write_sequences


def test_prometheus_scrapes_time_grad_norm_of_a_running_rnn(tmp_path):
    binary = require_tool("prometheus")
    port = free_port()
    out = tmp_path / "run"
    data = write_sequences(tmp_path / "seq.parquet", n=256, T=40, F=2, target="last")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distbackprop", "train", "--local", "--model", "rnn",
         "--hidden", "16", "--data", str(data), "--max-steps", "1500", "--batch-size", "32",
         "--chunk-steps", "10", "--metrics-port", str(port), "--metrics-linger", "120",
         "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        cfg = render_config(tmp_path / "prom", targets=[f"127.0.0.1:{port}"])
        with PrometheusServer(binary, cfg, tmp_path / "tsdb") as prom:
            prom.wait_target_up("distbackprop", timeout=90)
            norms = prom.wait_for("distbackprop_time_grad_norm > 0", lambda r: len(r) == 4,
                                  timeout=90)
            buckets = {r["metric"]["bucket"] for r in norms}
            assert buckets == {"t1-10", "t11-20", "t21-30", "t31-40"}
            assert all(r["metric"]["job"] == "distbackprop" for r in norms)
            ratio = prom.wait_for("distbackprop_time_grad_ratio", lambda r: len(r) == 1,
                                  timeout=30)
            # scraped at whatever step runs now: positive; the vanishing is judged below on
            # the history (after ~900 steps of learning, single steps reach ratios above 1)
            assert float(ratio[0]["value"][1]) > 0
            deadline = time.monotonic() + 300
            while not (out / "summary.json").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "training did not finish within 300 s"
                time.sleep(0.5)
            # lingering: the gauges hold the last step's values, as history.parquet does
            hist = pq.read_table(out / "history.parquet")
            last = {b: hist.column(f"time_grad_norm/{b}").to_numpy()[-1] for b in buckets}
            step = float(hist.column("step").to_numpy()[-1])
            prom.wait_for(f"distbackprop_step == {step}", lambda r: len(r) == 1, timeout=30)
            got = {r["metric"]["bucket"]: float(r["value"][1])
                   for r in prom.query("distbackprop_time_grad_norm")}
            for b in buckets:
                assert got[b] == pytest.approx(last[b], rel=1e-12), b
            early = (hist.column("time_grad_norm/t1-10").to_numpy()[:500]
                     / hist.column("time_grad_norm/t31-40").to_numpy()[:500])
            assert np.all(early < 1)  # the first time steps get less gradient: it vanishes
            want_ratio = last["t1-10"] / last["t31-40"]
            got_ratio = float(prom.query("distbackprop_time_grad_ratio")[0]["value"][1])
            assert got_ratio == pytest.approx(want_ratio, rel=1e-12)
            assert np.isfinite(want_ratio)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
