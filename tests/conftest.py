"""Shared fixtures: one Ray cluster per session, tools that must exist under CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Logical CPUs the session cluster advertises: enough for a 3-worker run plus
# the communicator tests' actors. Tests that use more ranks than the 2 real
# cores keep their models tiny (MPICH ranks busy-poll).
RAY_TEST_CPUS = 6


def require_tool(name: str) -> str:
    """Path of executable `name` (next to this Python first, then PATH); skip without it,
    but fail under CI=true."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    path = here if os.access(here, os.X_OK) else shutil.which(name)
    if path is None:
        msg = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{msg} (CI=true: a missing tool is a failure, not a skip)")
        pytest.skip(msg)
    return path


def require_module(name: str):
    try:
        return __import__(name)
    except ImportError:
        if IN_CI:
            pytest.fail(f"python module {name} is missing (CI=true)")
        pytest.skip(f"python module {name} is missing")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session; shut down at the end."""
    ray = require_module("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    ctx = ray.init(
        address="local",  # never a cluster found through Ray's address file
        num_cpus=RAY_TEST_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ctx
    ray.shutdown()


def run_cli(*args: str, timeout: float = 300, env: dict | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m distbackprop ARGS` and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "distbackprop", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd,
    )
