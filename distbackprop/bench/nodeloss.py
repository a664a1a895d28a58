"""bench nodeloss: what losing a whole worker node costs a run, on the namespaced harness.

A module of its own, not rows of `bench scaling`: it measures seconds of
recovery, not throughput, on a cluster of another shape (a head with 0 CPUs and
three worker nodes with 1 CPU each, every node in its own PID, UTS and IPC
namespaces: `runtime.localcluster`), so that the 2-worker group can be placed
again on the two nodes left without waiting for the lost one to come back; and
each kill costs a run start, the GCS verdict and a node restart (about a minute
here), which `bench scaling` should not pay.

Each kill: ``distbackprop train --workers 2 --placement spread --commit-seconds
0`` (a commit with every chunk, no checkpoints, the default model and data and
chunk length) against the harness, with the fault injection the node-loss tests
use: rank R writes its PID and sleeps at step PAUSE_STEP; that PID (from its
node's PID block) names the node, whose PID namespace is then SIGKILLed
(`Cluster.kill_node`): every process of that "machine" dies at once. The run's
summary.json says the rest (its first failure: `noticed_at`, `verdict_seconds`,
`reformed_seconds`, `resumed_at`, `resume_step`):

- detection: the kill → the coordinator's first sign of it (Ray's error for the rank);
- verdict wait: → the GCS declares the node dead (until then Ray counts its CPUs
  as free and would place the next group there, so the coordinator waits);
- re-formation: → the first chunk of the new group on the nodes left (the old
  group killed, a new placement group, actors, MPI rendezvous, state restored);
- total: the kill → that first chunk (≈ the sum of the three);
- steps lost: steps every rank had finished at the kill that are run again
  (PAUSE_STEP − resume_step): the chunk in flight, ~2 s of steps by default.

Cases alternate (rank 1's node, then rank 0's) for `kills` rounds; medians per
case. The killed node is restarted after each run, so every kill finds three.
On one host the kernel closes a killed process's connections at once, so peers
learn of the loss immediately; after a real power loss nothing is sent and the
first sign may be the GCS verdict itself: plan with detection + verdict wait,
not detection alone. The verdict takes Ray's default health checks (see
deploy/README.md, "Losing a node", to shorten them).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import harness, one_line

TITLE = ("nodeloss: SIGKILL of a worker node's namespace mid-run (harness: head 0 CPU + 3 "
         "nodes × 1 CPU), 2 workers spread, a commit every chunk, no checkpoints; median s")
PAUSE_STEP = 600
ARGS = ("--workers", "2", "--placement", "spread", "--commit-seconds", "0", "--max-steps",
        "1200", "--seed", "5", "--metrics-port", "0", "--quiet")
NODES = ("n1", "n2", "n3")
FIGURES = ("detection_s", "verdict_wait_s", "reformation_s", "total_s", "steps_lost")


def run(quick: bool = False) -> list[dict]:
    kills = 1 if quick else 3
    results: dict[int, list[dict]] = {1: [], 0: []}
    notes: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="dbp-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        cluster, why = harness(stack, Path(tmp) / "harness", NODES)
        if cluster is None:
            return [_row(rank, [], f"not measured: {why}") for rank in (1, 0)]
        for i in range(kills * 2):
            rank = 1 - i % 2  # rank 1's node, then rank 0's, alternately
            try:
                results[rank].append(_one_kill(cluster, Path(tmp) / f"run{i}", rank))
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                notes[rank] = f"kill {i // 2 + 1}: {one_line(exc)}"
            if i + 1 == kills * 2:
                break  # the last kill: no later one needs the node back
            try:
                _restore(cluster)
            except (RuntimeError, TimeoutError) as exc:
                for r in (1, 0):  # the cases left short of kills
                    notes.setdefault(r, f"the harness did not recover: {one_line(exc)}")
                break
    return [_row(rank, results[rank], notes.get(rank) if len(results[rank]) < kills else None)
            for rank in (1, 0)]


def _row(rank: int, runs: list[dict], note: str | None) -> dict:
    row: dict = {"case": f"rank {rank}'s node killed", "kills": len(runs)}
    for f in FIGURES:
        row[f] = float(np.median([r[f] for r in runs])) if runs else None
    if note:
        row["note"] = note
    return row


def _one_kill(cluster, out: Path, rank: int) -> dict:
    """One run with rank `rank`'s node killed at PAUSE_STEP; its figures (see module doc)."""
    from ..runtime.faults import ENV
    _wait_idle(cluster)
    faults = out.parent / f"{out.name}-faults"
    faults.mkdir(parents=True)
    env = {**cluster.driver_env(),
           ENV: json.dumps({"pause_at": {str(PAUSE_STEP): [rank]}, "dir": str(faults)})}
    cmd = [sys.executable, "-m", "distbackprop", "train", *ARGS, "--out", str(out),
           "--ray-address", cluster.address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        killed_at = _kill_at_pause(cluster, proc, faults / f"pause-{PAUSE_STEP}-{rank}.pid")
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the run exited {proc.returncode}: {err[-300:]}")
    failures = json.loads((out / "summary.json").read_text())["failures"]
    if not failures or failures[0]["resumed_at"] is None:
        raise RuntimeError(f"no recovery recorded: {failures}")
    f = failures[0]
    return {"detection_s": f["noticed_at"] - killed_at,
            "verdict_wait_s": f["verdict_seconds"],
            "reformation_s": f["reformed_seconds"],
            "total_s": f["resumed_at"] - killed_at,
            "steps_lost": PAUSE_STEP - f["resume_step"]}


def _kill_at_pause(cluster, proc: subprocess.Popen, pidfile: Path) -> float:
    """Wait for the paused rank's PID file, SIGKILL its node; time.time() of the kill."""
    deadline = time.monotonic() + 300
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the rank never reached step {PAUSE_STEP}")
        time.sleep(0.05)
    node = cluster.node_of_pid(int(pidfile.read_text()))
    if node is None:
        raise RuntimeError("the paused rank's PID is in no worker node's block")
    return cluster.kill_node(node)


def _wait_idle(cluster, timeout: float = 60.0) -> None:
    """Until no worker of an earlier run holds a CPU (Ray reaps them asynchronously)."""
    deadline = time.monotonic() + timeout
    while any(a["state"] != "DEAD" for a in cluster.actor_table("_ActorBody")):
        if time.monotonic() > deadline:
            raise RuntimeError("workers of an earlier run are still alive")
        time.sleep(0.5)


def _restore(cluster) -> None:
    """Start again every worker node a kill left dead (a second try if `ray start` gives up:
    it allows a node 30 s to register), and wait until all are alive."""
    for name in NODES:
        for attempt in range(2):
            if cluster.nodes[name].running():
                break
            try:
                cluster.restart_node(name)
            except RuntimeError:
                if attempt:
                    raise
    cluster.wait_nodes_alive(1 + len(NODES))
