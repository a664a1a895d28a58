"""A Ray cluster already running on the machine (or only its stale address file) changes
nothing for `distbackprop train` without an address: it starts a private instance."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from distbackprop.runtime.localcluster import stop_session

from ..conftest import require_tool, run_cli

ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records its head
TRAIN = ("train", "--workers", "2", "--hidden", "8", "--max-steps", "20", "--metrics-port",
         "0", "--quiet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def address_file_restored():
    old = ADDRESS_FILE.read_text() if ADDRESS_FILE.exists() else None
    yield
    if old is None:
        ADDRESS_FILE.unlink(missing_ok=True)
    else:
        ADDRESS_FILE.write_text(old)


@pytest.mark.ray
@pytest.mark.slow
def test_train_beside_a_running_head(tmp_path, address_file_restored):
    ray_bin = require_tool("ray")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (
                ADDRESS_FILE.exists() and ADDRESS_FILE.read_text().strip().endswith(f":{port}")):
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.2)
        recorded = ADDRESS_FILE.read_text()
        assert recorded.strip().endswith(f":{port}")
        r = run_cli(*TRAIN, "--out", str(tmp_path / "a"), env={"RAY_ADDRESS": "",
                                                                "RAY_AUTH_MODE": "disabled"})
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert head.poll() is None, "the running head was disturbed"
        assert ADDRESS_FILE.read_text() == recorded  # its address file too
    finally:
        # The head's own session, leader first: it stops its processes in ~2.5 s (a
        # SIGTERM to the whole group at once took ~34 s); SIGKILL whatever is left.
        stop_session(head, grace=60.0)


@pytest.mark.ray
def test_train_with_a_stale_address_file(tmp_path, address_file_restored):
    ADDRESS_FILE.parent.mkdir(parents=True, exist_ok=True)
    ADDRESS_FILE.write_text(f"127.0.0.1:{_free_port()}")  # a head that is gone
    r = run_cli(*TRAIN, "--out", str(tmp_path / "b"), env={"RAY_ADDRESS": "",
                                                            "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_an_unreachable_address_is_exit_1_naming_it(tmp_path):
    addr = f"127.0.0.1:{_free_port()}"
    r = run_cli(*TRAIN, "--out", str(tmp_path / "c"), "--ray-address", addr,
                env={"RAY_AUTH_MODE": "disabled"}, timeout=200)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"cannot join the Ray cluster at {addr}" in r.stderr
    assert "Traceback" not in r.stderr


def test_token_auth_refuses_a_ray_older_than_2_52(monkeypatch):
    import ray

    from distbackprop.errors import ConfigError
    from distbackprop.runtime.raysession import start_ray
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(ray, "__version__", "2.51.0")
    with pytest.raises(ConfigError, match=r"RAY_AUTH_MODE=token needs Ray >= 2.52; this is "
                                          r"Ray 2.51.0"):
        start_ray(None, 1)


_DAEMON_ENV = """
import json, os, sys
import psutil
from distbackprop.runtime.raysession import start_ray, stop_ray
assert start_ray(None, 1)
try:
    out = {}
    for p in psutil.Process().children(recursive=True):
        # the program: the executable, or the script Python runs (other daemons name the
        # raylet and the GCS in their arguments)
        argv = p.cmdline()
        prog = [os.path.basename(a) for a in argv[:3]]
        name = next((d for d in ("log_monitor.py", "raylet", "gcs_server") if d in prog),
                    None)
        if name is not None and name not in out:
            env = p.environ()
            out[name] = {k: env.get(k) for k in sys.argv[1:]}
    print(json.dumps(out))
finally:
    stop_ray()
"""


@pytest.mark.ray
def test_a_private_instance_quiets_its_daemons():
    """The instance `train` starts has its log monitor list log files every 5 s, not ten
    times a second, no Ray metrics and the agent's process scan once a minute:
    `QUIET_DAEMONS` reaches the environment of the log monitor, raylet and GCS. (The
    dashboard agent, which the raylet starts with its own environment, renames itself
    over the memory /proc/PID/environ reads.)"""
    import json
    import sys

    from distbackprop.runtime.raysession import QUIET_DAEMONS
    env = {k: v for k, v in os.environ.items()
           if k not in QUIET_DAEMONS and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "-c", _DAEMON_ENV, *QUIET_DAEMONS],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(seen) == ["gcs_server", "log_monitor.py", "raylet"]
    for daemon, values in seen.items():
        assert values == QUIET_DAEMONS, daemon
