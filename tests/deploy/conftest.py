"""Helpers for the deployment tests: free ports, owned process trees, a wheelhouse.

The deployment tests start real servers (a Ray head, sshd, containers). Each one
is started in a session of its own (`start_new_session=True`) so that the test
can stop exactly what it started, including grandchildren that moved to other
process groups (Ray's workers do), and nothing else on this shared machine
(`distbackprop.runtime.localcluster.stop_session`, which the harness uses too).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
# Survives between runs on one machine (the wheelhouse, the debootstrap root);
# every test still works from an empty cache.
CACHE = Path(os.environ.get("DISTBACKPROP_TEST_CACHE", "/var/cache/distbackprop-test"))


def tool(name: str) -> str:
    """An executable from this interpreter's environment, else from PATH.

    scripts/test.sh runs pytest with .venv/bin/python without activating the venv,
    so console scripts installed there (ray, hadolint) are not on PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_tool(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def run(cmd: list[str], *, timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output; on failure the output is in the message."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {res.returncode}\n"
            f"--- stdout\n{res.stdout[-6000:]}\n--- stderr\n{res.stderr[-6000:]}"
        )
    return res


def _copy_sources(dest: Path) -> Path:
    """The files a wheel is built from, without the working tree's build litter."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "distbackprop", dest / "distbackprop",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return dest


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Path:
    """A wheel of the working tree's package, built once per session."""
    work = tmp_path_factory.mktemp("wheelsrc")
    src = _copy_sources(work / "src")
    dist = work / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        timeout=300)
    (wheel,) = dist.glob("distbackprop-*.whl")
    return wheel


@pytest.fixture(scope="session")
def wheelhouse(project_wheel) -> Path:
    """Every dependency of the package as a cp311 manylinux wheel, cached under CACHE.

    Offline from the cache when it is complete; otherwise pip fills it from the
    index. Ray is pinned to the version the test process runs, so the cluster
    nodes and the `ray` client here agree.
    """
    house = CACHE / "wheels"
    house.mkdir(parents=True, exist_ok=True)
    for d in (CACHE, house):
        d.chmod(0o755)  # the launcher test's unprivileged user installs from here
    reqs = [str(project_wheel), f"ray[default]=={importlib.metadata.version('ray')}",
            "setuptools>=68", "wheel"]
    base = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(house),
            "--find-links", str(house)]
    offline = run([*base, "--no-index", *reqs], timeout=600, check=False)
    if offline.returncode != 0:
        run([*base, *reqs], timeout=1800)
    for stale in house.glob("distbackprop-*.whl"):
        stale.unlink()
    for whl in house.iterdir():
        whl.chmod(0o644)
    return house
