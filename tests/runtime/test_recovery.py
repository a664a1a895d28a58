"""Reliability: a killed or hung worker costs a restart, not the run; resume is exact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from distbackprop import TrainConfig, Trainer
from tests.conftest import run_cli

pytestmark = pytest.mark.ray

BASE = dict(hidden=(32,), max_steps=40, batch_size=64, seed=5, metrics_port=0, quiet=True,
            chunk_steps=4, workers=2)


def _fit(path, **kw):
    return Trainer(TrainConfig(**{**BASE, **kw, "out": str(path)})).fit()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-worker run every recovery must reproduce bit for bit."""
    return _fit(tmp_path_factory.mktemp("ref") / "run")


def _faults(monkeypatch, tmp_path, **kinds) -> None:
    d = tmp_path / "faults"
    d.mkdir()
    monkeypatch.setenv("DISTBACKPROP_TEST_FAULTS", json.dumps({**kinds, "dir": str(d)}))


def test_sigkill_worker_from_outside_recovers_bit_identical(ray_cluster, reference, tmp_path,
                                                            monkeypatch):
    _faults(monkeypatch, tmp_path, pause_at={"17": [1]})
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("res", _fit(tmp_path / "run")),
                         daemon=True)
    t.start()
    pidfile = tmp_path / "faults" / "pause-17-1.pid"
    deadline = time.monotonic() + 120
    while not pidfile.exists() and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.05)
    assert pidfile.exists(), "rank 1 never reached step 17"
    pid = int(pidfile.read_text())
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive()
    res = box["res"]
    s = res.summary
    assert s["restarts"] == 1
    assert s["failures"][0]["ranks"] == [1]
    assert s["failures"][0]["detected_at"] - killed_at < 30  # recovery begins within 30 s
    assert np.array_equal(res.model.params, reference.model.params)  # bit-identical
    assert s["steps"] == 40
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_watchdog_catches_a_hung_worker(ray_cluster, reference, tmp_path, monkeypatch):
    _faults(monkeypatch, tmp_path, hang_at={"9": [0]})
    res = _fit(tmp_path / "run", watchdog_seconds=6)
    s = res.summary
    assert s["restarts"] == 1
    assert "did not finish" in s["failures"][0]["message"]
    assert np.array_equal(res.model.params, reference.model.params)
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
               for p in res.worker_pids)


class RunProcesses:
    """The processes one CLI run started, and only those: other Ray instances on the machine
    (other tests, other users) can neither fail nor pass the leak check.

    A process belongs to the run when it was seen as a descendant of the run's process, or
    when its command line names the run's own Ray temp dir (``RAY_TMPDIR``: raylet, GCS and
    Ray workers carry their session directory on the command line, even once orphaned).
    Each is identified by (pid, start time), so a recycled PID is not mistaken for it.
    """

    def __init__(self, root_pid: int, marker: str):
        self.root_pid = root_pid
        self.marker = marker
        self.seen: dict[int, float] = {}
        self.commands: dict[int, str] = {}  # as first seen, for messages and the self-check

    def _add(self, p: psutil.Process) -> None:
        if p.pid in self.seen:
            return
        with contextlib.suppress(psutil.Error):
            started, cmd = p.create_time(), " ".join(p.cmdline())
            self.seen[p.pid] = started
            self.commands[p.pid] = cmd

    def poll(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.root_pid).children(recursive=True):
                self._add(child)
        for p in psutil.process_iter(["pid", "cmdline"]):
            if self.marker in " ".join(p.info["cmdline"] or []):
                self._add(p)

    def alive(self) -> list[psutil.Process]:
        """Attributed processes still running (zombies count as gone)."""
        left = []
        for pid, started in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.Error:
                pass
        return left


def test_max_failures_exits_1_naming_the_checkpoint(tmp_path):
    d = tmp_path / "faults"
    d.mkdir()
    # Short, unique Ray temp dir: socket paths under it must stay below the AF_UNIX limit.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dbp-rec-", dir="/tmp"))
    env = {**os.environ, "DISTBACKPROP_TEST_FAULTS": json.dumps(
        {"exit_at": {"6": [1], "14": [0]}, "dir": str(d)}),
        "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distbackprop", "train", "--workers", "2", "--hidden", "16",
         "--max-steps", "40", "--chunk-steps", "2", "--checkpoint-every", "4",
         "--max-failures", "1", "--metrics-port", "0", "--quiet",
         "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = RunProcesses(proc.pid, str(ray_tmp))
    left: list[psutil.Process] = []
    out: dict = {}

    def drain() -> None:
        out["stdout"], out["stderr"] = proc.communicate()

    # drain the pipes in a thread while polling, so a chatty run cannot block on them
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        while reader.is_alive() and time.monotonic() - t0 < 120:
            run.poll()
            reader.join(timeout=0.2)
        assert not reader.is_alive(), "the run did not end within 120 s"
        stderr = out["stderr"]
        assert proc.returncode == 1, stderr[-2000:]
        # each exit was seen as a death when it happened, not waited out by the watchdog
        assert stderr.count("died") >= 1 and "did not finish" not in stderr, stderr[-2000:]
        assert "Last good checkpoint:" in stderr
        assert "checkpoints/step-00000012" in stderr, stderr[-2000:]
        assert "rank 0" in stderr
        # the check below means something only if the run's Ray session was seen
        assert any("raylet" in c for c in run.commands.values()), run.commands
        assert any("gcs_server" in c for c in run.commands.values()), run.commands
        deadline = time.monotonic() + 10
        while (left := run.alive()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [run.commands[p.pid] for p in left]
        print(f"\n{len(run.seen)} processes attributed to the run, none left")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=30)
        for p in run.alive():  # only what this run started, by PID
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("mode", ["local", "workers"])
def test_resume_is_bit_identical(ray_cluster, tmp_path, mode):
    kw = {"local": True} if mode == "local" else {"workers": 2}
    full = _fit(tmp_path / "full", max_steps=200, chunk_steps=None, **kw)
    _fit(tmp_path / "part", max_steps=100, checkpoint_every=50, chunk_steps=None, **kw)
    resumed = _fit(tmp_path / "resumed-ignored", resume=str(tmp_path / "part"), max_steps=200,
                   checkpoint_every=50, chunk_steps=None, **kw)
    assert resumed.run_dir == tmp_path / "part"
    assert np.array_equal(resumed.model.params, full.model.params)
    assert resumed.summary["steps"] == 200
    steps = resumed.history.column("step").to_numpy()
    assert list(steps) == list(range(200))
    np.testing.assert_array_equal(resumed.history.column("loss").to_numpy(),
                                  full.history.column("loss").to_numpy())


def test_resume_refuses_changed_model(tmp_path):
    _fit(tmp_path / "part", local=True, max_steps=10, checkpoint_every=5)
    r = run_cli("train", "--local", "--resume", str(tmp_path / "part"), "--hidden", "64",
                "--max-steps", "20", "--metrics-port", "0", "--quiet")
    assert r.returncode == 2
    assert "hidden: cannot change when resuming" in r.stderr
