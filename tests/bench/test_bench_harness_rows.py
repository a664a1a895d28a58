"""The rows of the benches that rehearse a cluster: what they say when the harness cannot
run, and how the harness row is set beside the others (no cluster started here)."""

from __future__ import annotations

import math

import pytest

from distbackprop import bench
from distbackprop.bench import nodeloss, scaling
from distbackprop.runtime import localcluster


def _fig(sps: float, step_ms: float) -> dict:
    return {"sps": sps, "step_ms": step_ms, "allreduce_ms": 1.0, "overhead_us": 10.0,
            "opt_MB": 1.0}


def _results(harness: list[dict]) -> dict[str, list[dict]]:
    out = {name: [_fig(200.0, 100.0)] for name in scaling.VARIANTS}
    out["1 worker"] = [_fig(100.0, 90.0)]
    out[scaling.HARNESS] = harness
    return out


def test_nodeloss_says_why_when_the_harness_cannot_run(monkeypatch):
    monkeypatch.setattr(localcluster, "unavailable", lambda: "no unshare here")
    rows = nodeloss.run(quick=True)
    assert [r["case"] for r in rows] == ["rank 1's node killed", "rank 0's node killed"]
    for r in rows:
        assert r["kills"] == 0 and r["note"] == "not measured: no unshare here"
        assert all(r[f] is None for f in nodeloss.FIGURES)


def test_scaling_keeps_a_row_without_figures_when_the_harness_cannot_run():
    rows = scaling._rows(_results([]), [1.0], "no unshare here")
    (row,) = [r for r in rows if r["variant"] == scaling.HARNESS]
    assert row["samples/s"] is None and row["note"] == "not measured: no unshare here"
    assert not any(r["variant"].startswith("2 nodes vs 1 node") for r in rows)


def test_scaling_sets_the_harness_beside_two_workers_on_one_node():
    rows = {r["variant"]: r for r in scaling._rows(
        _results([_fig(150.0, 130.0), _fig(170.0, 110.0)]), [1.0], None)}
    two_nodes = rows[scaling.HARNESS]
    assert two_nodes["samples/s"] == 160.0 and "note" not in two_nodes  # the median of 2
    assert math.isclose(two_nodes["efficiency"], 160.0 / (2 * 100.0))
    vs = rows["2 nodes vs 1 node (2 workers)"]
    assert math.isclose(vs["efficiency"], 160.0 / 200.0)
    assert math.isclose(vs["step_ms"], 120.0 - 100.0)


def test_scaling_compares_the_harness_with_two_workers_run_in_its_rounds():
    res = _results([_fig(150.0, 130.0)])
    res[scaling.BESIDE] = [_fig(180.0, 105.0)]  # one node, while the harness was up
    rows = {r["variant"]: r for r in scaling._rows(res, [1.0], None)}
    assert rows[scaling.BESIDE]["samples/s"] == 180.0
    vs = rows["2 nodes vs 1 node (2 workers)"]
    assert math.isclose(vs["efficiency"], 150.0 / 180.0)
    assert math.isclose(vs["step_ms"], 130.0 - 105.0)
    assert math.isclose(rows["metrics cost (on vs off, 2 workers)"]["efficiency"], 1.0)


@pytest.mark.parametrize("text,want", [
    ("boom", "boom"),
    ("node n1 exited (log x):\n\n=== cmd\nTraceback\nException: timed out\n",
     "node n1 exited (log x): … Exception: timed out"),
])
def test_one_line_keeps_the_first_and_the_last_line(text, want):
    assert bench.one_line(RuntimeError(text)) == want


def test_every_bench_is_a_cli_choice():
    from distbackprop.cli import _parser
    sub = next(a for a in _parser()._actions if a.dest == "command")
    choices = next(a for a in sub.choices["bench"]._actions if a.dest == "which").choices
    assert set(bench.ALL) | {"all"} == set(choices)


def test_scaling_sets_ddp_beside_the_two_worker_variants():
    res = _results([])
    res["2 workers"] = [_fig(300.0, 100.0)]
    res[scaling.DDP] = [{"sps": 240.0, "step_ms": 5.0}, {"sps": 260.0, "step_ms": 7.0}]
    rows = {r["variant"]: r for r in scaling._ddp_rows(res, None)}
    assert rows[scaling.DDP]["samples/s"] == 250.0 and rows[scaling.DDP]["step_ms"] == 6.0
    assert math.isclose(rows[scaling.DDP]["efficiency"], 250.0 / (2 * 100.0))
    assert math.isclose(rows["2 workers vs DDP (samples/s ratio)"]["efficiency"], 300 / 250)
    sharded = rows["2 workers, sharded update (ZeRO-1) vs DDP (samples/s ratio)"]
    assert math.isclose(sharded["efficiency"], 200.0 / 250.0)


def test_scaling_says_why_without_torch(monkeypatch):
    monkeypatch.setenv("DISTBACKPROP_TORCH_PYTHON", "/nonexistent/python")
    py, why = scaling.torch_python()
    assert py is None and "/nonexistent/python" in why
    res = _results([])
    res[scaling.DDP] = []
    (row,) = scaling._ddp_rows(res, why)
    assert row["samples/s"] is None and row["note"].startswith("not measured: ")


def test_scaling_sets_each_round_against_the_one_worker_runs_around_it():
    """1-worker runs at 100, 50, 100 samples/s (the machine slowed, then recovered); each
    round's 2-worker runs reach 0.9 of 2 × the geometric mean of the runs around it. The
    table says 0.9; the ratio of the medians would say 127.3 / 200 = 0.64."""
    res = _results([])
    res["1 worker"] = [_fig(100.0, 90.0), _fig(50.0, 90.0), _fig(100.0, 90.0)]
    ref = math.sqrt(100.0 * 50.0)
    for name in [*scaling.VARIANTS, scaling.DDP]:
        if name != "1 worker":
            res[name] = [_fig(2 * 0.9 * ref, 90.0), _fig(2 * 0.9 * ref, 90.0)]
    rows = {r["variant"]: r for r in scaling._rows(res, [1.0], "no unshare here")
            + scaling._ddp_rows(res, None)}
    assert rows["1 worker"]["samples/s"] == 100.0 and rows["1 worker"]["efficiency"] == 1.0
    for name in ("2 workers, sharded update (ZeRO-1)", "2 workers", scaling.DDP):
        assert math.isclose(rows[name]["efficiency"], 0.9), name
    assert scaling.references([100.0, 50.0, 100.0], 1) == [ref]  # a round that ran alone
    assert scaling.references([100.0, 50.0], 2) == [100.0, 50.0]  # no closing run


def test_scaling_sets_the_machine_ceilings_beside_the_variants():
    res = _results([])
    res[scaling.CEILING] = [{"alone_ms": 7.0, "slower_ms": s, "ceiling": 7.0 / s}
                            for s in (7.0, 8.0, 10.0)]
    res[scaling.CEILING_STEP] = [{"alone_ms": 20.0, "slower_ms": s, "ceiling": 20.0 / s}
                                 for s in (25.0, 21.0, 22.0)]
    rows = {r["variant"]: r for r in scaling._rows(res, [1.0], "no unshare here")}
    assert math.isclose(rows[scaling.CEILING]["efficiency"], 7.0 / 8.0)
    assert rows[scaling.CEILING]["step_ms"] == 8.0 and rows[scaling.CEILING]["samples/s"] is None
    assert math.isclose(rows[scaling.CEILING_STEP]["efficiency"], 20.0 / 22.0)
    assert rows[scaling.CEILING_STEP]["step_ms"] == 22.0


def test_the_ceiling_is_set_by_the_slower_of_two(monkeypatch):
    from distbackprop.bench import lockstep
    monkeypatch.setattr(lockstep, "_at_once",
                        lambda n, s, kind: [6.0] if n == 1 else [7.5, 9.0])
    assert lockstep.ceiling() == {"alone_ms": 6.0, "slower_ms": 9.0, "ceiling": 6.0 / 9.0}


def test_the_matmul_loops_run_as_processes():
    """Two real processes, one BLAS thread each, over the same half second."""
    from distbackprop.bench import lockstep
    a, b = lockstep._at_once(2, 0.5)
    assert 0.0 < a < 500.0 and 0.0 < b < 500.0  # ms per 256×1024 @ 1024×1024 matmul


def test_the_step_loops_run_as_processes():
    """The whole reference step (this project's forward, backward and Adam update) in two
    real processes over the same second: each step takes longer than the bare matmul of
    its largest layer, timed in one more process afterwards."""
    from distbackprop.bench import lockstep
    steps = lockstep._at_once(2, 1.0, "step")
    (matmul,) = lockstep._at_once(1, 0.5)
    assert all(matmul < s < 5000.0 for s in steps), (steps, matmul)


def test_bench_compute_times_the_reference_step():
    from distbackprop.bench import compute
    rows = {r["measure"]: r for r in compute.run(quick=True)}
    step = rows["step: forward + backward + update"]["ms"]
    assert 0.0 < rows["forward"]["ms"] < step and 0.0 < rows["backward (+ loss)"]["ms"] < step


def test_a_matmul_loop_that_fails_is_named(monkeypatch):
    import sys

    from distbackprop.bench import lockstep
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="the matmul loop exited 1"):
        lockstep._at_once(2, 0.1)
