"""bench scaling: weak scaling of the reference MLP over Ray workers, same run, medians.

Each worker keeps 256 examples per step (global batch 256·N) and 1 CPU, as
the 1-worker reference does, so perfect weak scaling is N× its samples/s.
Variants are run in interleaved rounds so drifting machine load hits all of
them alike: overlap on/off, the update on the workers vs on the coordinator,
the sharded update with θ and gradients shared in /dev/shm (the default) vs
through MPI's Reduce_scatter + Allgather, and metrics on vs off. Each round
opens with the 1-worker run and one more closes the last, so every round sits
between two; a variant's efficiency is the median over rounds of its samples/s
against N × the geometric mean of its round's two 1-worker runs. Also
measured: start-up (command start to first step, through the real CLI), the
coordination overhead per step, and in each round what the machine allows two
ranks in lockstep with none of Ray or MPI (`lockstep`: a loop alone, then two at
once; the slower sets a pair's pace): the reference layer's bare matmul, and the
whole reference step as a worker runs it (forward, backward, the Adam update).

"2 workers on 2 nodes (namespaced harness)" is the "2 workers" configuration
on a rehearsed cluster (`runtime.localcluster`): a head with 0 CPUs and two
worker nodes with 1 CPU each, every node in its own PID, UTS and IPC
namespaces, so the two ranks are on different "machines" (MPI over TCP on
loopback, no shared memory). The cluster is started after the other variants'
rounds: idle, its daemons still take ~5% of this machine's 2 cores, which costs
runs that use both cores (2 workers) more than the 1-worker reference. Its own
rounds then run the "2 workers" configuration twice: on one node of this
process's private Ray instance ("2 workers, 1 node, harness cluster up") and on
the harness — side by side under the same load, the "2 nodes vs 1 node" row. A
process can drive one Ray instance at a time, so the harness run is
`distbackprop train --config CONFIG` in a subprocess, CONFIG being the very
`TrainConfig` of the "2 workers" row plus ``ray_address`` (the harness) and
``placement: spread``; its figures come from that run's summary.json and
history.parquet, computed as for the other rows. Without root or `unshare` the
row has no figures and a note says why.

"PyTorch DDP (gloo)" is the same job (model, batch per process, Adam, float32)
under torch's DistributedDataParallel, 2 processes × 1 thread, run in each
round by `ddp_reference.py` with an interpreter that has torch (not a
dependency): ``$DISTBACKPROP_TORCH_PYTHON``, else this one. Without torch the
row says so; the "vs DDP" rows divide samples/s measured in the same rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import harness, lockstep, one_line

TITLE = "scaling: reference MLP 784-1024-1024-10, 256 examples/worker/step, 1 CPU per worker"
PER_WORKER = 256


def _dataset(directory: Path, rows: int = 4096) -> Path:
    from ..data.tables import write_parquet
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 784)).astype(np.float32)
    y = rng.integers(0, 10, rows)
    cols = {f"f{i}": x[:, i] for i in range(784)}
    cols["target"] = y
    path = directory / "bench.parquet"
    write_parquet(path, cols)
    return path


def _config(data: Path, out: Path, workers: int, steps: int, **kw):
    from ..config import TrainConfig
    return TrainConfig(data=str(data), hidden=(1024, 1024), batch_size=PER_WORKER * workers,
                       workers=workers, cpus_per_worker=1, max_steps=steps, quiet=True,
                       val_fraction=0.0, out=str(out), **{"metrics_port": 0, **kw})


def _run(data: Path, out: Path, workers: int, steps: int, **kw) -> dict:
    from ..runtime.trainer import Trainer
    res = Trainer(_config(data, out, workers, steps, **kw)).fit()
    h = res.history
    return _figures(res.summary, {c: h.column(c).to_numpy()
                                  for c in ("step_seconds", "time/allreduce")})


def _figures(summary: dict, history: dict[str, np.ndarray]) -> dict:
    """A run's row figures from its summary and history columns (warm steps only)."""
    step_s = history["step_seconds"]
    warm = slice(min(5, len(step_s) - 1), None)
    return {
        "sps": summary["samples_per_second"],
        "step_ms": float(np.median(step_s[warm])) * 1e3,
        "allreduce_ms": float(np.median(history["time/allreduce"][warm])) * 1e3,
        "overhead_us": (summary["coordination_seconds_per_step"] or 0.0) * 1e6,
        "opt_MB": summary["optimizer_bytes_per_worker"] / 1e6,
    }


def _run_on_harness(cluster, data: Path, out: Path, steps: int) -> dict:
    """The "2 workers" run on the harness cluster, through the CLI in a subprocess."""
    from ..metrics.history import read_columns
    cfg = _config(data, out, 2, steps, overlap=False, update_on="workers", placement="spread",
                  ray_address=cluster.address)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(cfg.to_yaml())
    r = subprocess.run([sys.executable, "-m", "distbackprop", "train", "--config", str(path)],
                       capture_output=True, text=True, env=cluster.driver_env(), timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"the harness run exited {r.returncode}: {r.stderr[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    return _figures(summary, read_columns(out / "history.parquet"))


def _startup_seconds(data: Path, out: Path) -> float:
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "distbackprop", "train", "--workers", "2",
                        "--data", str(data), "--hidden", "1024,1024", "--batch-size", "512",
                        "--max-steps", "4", "--metrics-port", "0", "--quiet", "--val-fraction",
                        "0", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"start-up run failed: {r.stderr[-500:]}")
    return float(json.loads((out / "summary.json").read_text())["startup_seconds"])


VARIANTS = {
    "1 worker": dict(workers=1),
    "2 workers": dict(workers=2, overlap=False, update_on="workers"),
    "2 workers, overlap": dict(workers=2, overlap=True, update_on="workers"),
    "2 workers, update on coordinator": dict(workers=2, update_on="coordinator"),
    "2 workers, sharded update (ZeRO-1)": dict(workers=2, update_on="sharded"),
    # the same through MPI's Reduce_scatter + Allgather instead of shared θ and gradients
    "2 workers, sharded, MPI collectives (--no-node-shm)": dict(workers=2, update_on="sharded",
                                                                 node_shm=False),
    # a free port each run
    "2 workers, metrics on": dict(workers=2, metrics_port=0, update_on="workers"),
}
HARNESS = "2 workers on 2 nodes (namespaced harness)"
BESIDE = "2 workers, 1 node, harness cluster up"  # the reference for HARNESS, same rounds
DDP = "PyTorch DDP (gloo), 2 processes × 1 thread"
# what the machine allows a pair in lockstep in each round (`lockstep`): step_ms is the
# slower process's ms per loop, efficiency alone ÷ slower; the bare matmul (median), then
# the whole reference step as a worker runs it, update included (mean)
CEILING = "machine ceiling: a matmul loop alone vs the slower of 2 at once (no Ray/MPI; ms/matmul)"
CEILING_STEP = ("machine ceiling, whole step: the reference step alone vs the slower of 2 at "
                "once (no Ray/MPI; mean ms/step)")
CEILINGS = {CEILING: "matmul", CEILING_STEP: "step"}


def torch_python() -> tuple[str | None, str | None]:
    """(an interpreter that imports torch, None) or (None, why not)."""
    py = os.environ.get("DISTBACKPROP_TORCH_PYTHON") or sys.executable
    try:
        r = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{py}: {one_line(exc)}"
    if r.returncode != 0:
        return None, (f"torch is not importable by {py} (set DISTBACKPROP_TORCH_PYTHON to an "
                      "interpreter that has it)")
    return py, None


def _run_ddp(py: str, steps: int) -> dict:
    """The reference job under DDP with 2 processes (see ddp_reference.py)."""
    script = Path(__file__).with_name("ddp_reference.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([py, str(script), "2", str(steps), str(PER_WORKER)], capture_output=True,
                       text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"the DDP run exited {r.returncode}: {r.stderr[-500:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"sps": out["samples_per_second"], "step_ms": out["step_ms"]}


def run(quick: bool = False) -> list[dict]:
    # 300-step runs: a 120-step run's samples/s carries a whole scheduling hiccup (one
    # round's 2-worker efficiency ranged 0.89-1.05 over three rounds at 120 steps)
    steps = 30 if quick else 300
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="dbp-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        tmp_path = Path(tmp)
        data = _dataset(tmp_path)
        startups = [_startup_seconds(data, tmp_path / f"startup{i}") for i in range(rounds)]
        from ..metrics.exporter import MetricsExporter  # noqa: F401 - fail early if missing
        from ..runtime.raysession import local_ray
        with local_ray(num_cpus=max(2, os.cpu_count() or 2)):
            results, why_ddp = _rounds(data, tmp_path, steps, rounds)
            cluster, why = harness(stack, tmp_path / "harness", ("n1", "n2"))
            why = _harness_rounds(results, cluster, why, data, tmp_path, steps, rounds)
    return _rows(results, startups, why) + _ddp_rows(results, why_ddp)


def _rounds(data: Path, tmp_path: Path, steps: int, rounds: int
            ) -> tuple[dict[str, list[dict]], str | None]:
    """Every variant once per round, then DDP; per variant its runs' figures (DDP's list
    stays empty if it cannot run: the note says why). Keys for the harness rounds too."""
    results: dict[str, list[dict]] = {k: [] for k in [*VARIANTS, *CEILINGS, DDP, BESIDE,
                                                      HARNESS]}
    py, why_ddp = torch_python()
    for r in range(rounds):
        for name, kw in VARIANTS.items():
            results[name].append(_run_variant(data, tmp_path / _slug(f"{name}-{r}"), steps,
                                              kw))
        for name, kind in CEILINGS.items():
            results[name].append(lockstep.ceiling(2.0 if steps < 100 else lockstep.SECONDS,
                                                  kind))
        if py is not None:
            try:
                results[DDP].append(_run_ddp(py, steps))
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
                py, why_ddp = None, f"round {r + 1}: {one_line(exc)}"
    # one more 1-worker run closes the last round: each round is then bracketed by the
    # 1-worker runs before and after it (`references`)
    results["1 worker"].append(_run_variant(data, tmp_path / f"1_worker-{rounds}", steps,
                                            VARIANTS["1 worker"]))
    return results, why_ddp


def references(one: list[float], rounds: int) -> list[float]:
    """Round r's 1-worker samples/s: the geometric mean of the 1-worker runs that open
    and close it (`one` has rounds + 1 runs; with `rounds` runs, each round's own).

    The machine's speed drifts by ±10% over minutes here, and a round's variants run
    over ~5 minutes after its first run: bracketing cancels a drift that is linear over
    the round."""
    if len(one) > rounds:
        return [float(np.sqrt(one[r] * one[r + 1])) for r in range(rounds)]
    return [float(x) for x in one]


def _run_variant(data: Path, out: Path, steps: int, kw: dict) -> dict:
    kw = dict(kw)
    w = kw.pop("workers")
    if "metrics_port" in kw:
        kw["metrics_port"] = _free_port()
    return _run(data, out, w, steps, **kw)


def _harness_rounds(results: dict[str, list[dict]], cluster, why: str | None, data: Path,
                    tmp_path: Path, steps: int, rounds: int) -> str | None:
    """With the harness cluster up: per round "2 workers" on one node, then on two
    (into `results`); returns why the harness rows are missing or short, or None."""
    if cluster is None or why is not None:
        return why
    for r in range(rounds):
        try:
            results[BESIDE].append(_run_variant(data, tmp_path / _slug(f"{BESIDE}-{r}"),
                                                steps, VARIANTS["2 workers"]))
            results[HARNESS].append(_run_on_harness(
                cluster, data, tmp_path / _slug(f"{HARNESS}-{r}"), steps))
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return f"round {r + 1}: {one_line(exc)}"
    return None


def _ddp_rows(results: dict[str, list[dict]], why: str | None) -> list[dict]:
    """DDP's row and distbackprop's 2-worker variants divided by it (samples/s)."""
    if not results[DDP]:
        return [{"variant": DDP, "samples/s": None, "note": f"not measured: {why}"}]
    ddp = float(np.median([x["sps"] for x in results[DDP]]))
    base = float(np.median([x["sps"] for x in results["1 worker"]]))
    rows = [{"variant": DDP, "samples/s": ddp, "efficiency": _efficiency(results, DDP, 2, base),
             "step_ms": float(np.median([x["step_ms"] for x in results[DDP]]))}]
    for name in ("2 workers", "2 workers, sharded update (ZeRO-1)"):
        ours = float(np.median([x["sps"] for x in results[name]]))
        rows.append({"variant": f"{name} vs DDP (samples/s ratio)", "samples/s": ours,
                     "efficiency": ours / ddp})
    if why is not None:
        rows[0]["note"] = f"{len(results[DDP])} round(s) only; {why}"
    return rows


def _efficiency(results: dict[str, list[dict]], name: str, n: int, base: float) -> float:
    """samples/s ÷ (n × the 1-worker samples/s): for a variant of the interleaved rounds,
    the median over rounds of each round's ratio against its bracketing 1-worker runs
    (`references`); for the harness rounds (no 1-worker run among them), the median
    samples/s against the median 1-worker run (`base`)."""
    if name == "1 worker":
        return 1.0
    runs = [x["sps"] for x in results[name]]
    refs = references([x["sps"] for x in results["1 worker"]], len(runs))
    if (name not in VARIANTS and name != DDP) or len(refs) < len(runs):
        return float(np.median(runs)) / (n * base)
    return float(np.median([s / (n * b) for s, b in zip(runs, refs, strict=True)]))


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")


def _rows(results: dict[str, list[dict]], startups: list[float], why: str | None) -> list[dict]:
    med = {k: {f: float(np.median([x[f] for x in v])) for f in v[0]}
           for k, v in results.items() if v and k != DDP and k not in CEILINGS}
    base = med["1 worker"]["sps"]
    rows = []
    for name, m in med.items():
        n = 1 if name == "1 worker" else 2
        rows.append({"variant": name, "samples/s": m["sps"],
                     "efficiency": _efficiency(results, name, n, base),
                     "step_ms": m["step_ms"], "allreduce_ms": m["allreduce_ms"],
                     "coordination_us/step": m["overhead_us"],
                     "optimizer_MB/worker": m["opt_MB"]})
    if HARNESS not in med:
        rows.append({"variant": HARNESS, "samples/s": None, "efficiency": None,
                     "note": f"not measured: {why}"})
    elif why is not None:  # some rounds failed: the median is over the others
        rows[-1]["note"] = f"{len(results[HARNESS])} round(s) only; {why}"
    off, on = med["2 workers"], med["2 workers, metrics on"]
    rows.append({"variant": "metrics cost (on vs off, 2 workers)",
                 "samples/s": on["sps"], "efficiency": on["sps"] / off["sps"],
                 "step_ms": on["step_ms"] - off["step_ms"]})
    if HARNESS in med:
        two, off = med[HARNESS], med.get(BESIDE, off)
        rows.append({"variant": "2 nodes vs 1 node (2 workers)", "samples/s": two["sps"],
                     "efficiency": two["sps"] / off["sps"],
                     "step_ms": two["step_ms"] - off["step_ms"],
                     "allreduce_ms": two["allreduce_ms"] - off["allreduce_ms"]})
    for name in CEILINGS:
        if results.get(name):
            rows.append({"variant": name, "samples/s": None,
                         "efficiency": float(np.median([x["ceiling"] for x in results[name]])),
                         "step_ms": float(np.median([x["slower_ms"] for x in results[name]]))})
    rows.append({"variant": "start-up to first step, 2 workers (CLI, median; ms)",
                 "samples/s": None, "efficiency": None,
                 "step_ms": float(np.median(startups)) * 1e3})
    return rows


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
