"""bench rnn runs and reports its ratio against the same run's GEMMs (no timing asserted)."""

from __future__ import annotations

import math

from distbackprop.bench import rnn


def test_bench_rnn_quick_reports_the_ratio():
    rows = rnn.run(quick=True)
    assert rows and rows[-1]["blas_threads"] >= 1
    for r in rows:
        assert r["bptt_step_ms"] > 0 and r["3x_gemms_ms"] > 0
        assert math.isclose(r["ratio"], r["bptt_step_ms"] / r["3x_gemms_ms"], rel_tol=1e-9)
