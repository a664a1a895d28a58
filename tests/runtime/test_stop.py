"""A stop signal never loses a run: it saves, exits 130/143, and `--resume` continues exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distbackprop.checkpoint import list_checkpoints, verify_checkpoint
from distbackprop.nn import load_model

from ..conftest import run_cli

COMMON = ("--hidden", "8", "--dtype", "float64", "--metrics-port", "0", "--quiet",
          "--chunk-steps", "20", "--checkpoint-every", "1000", "--lr", "0.01")


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "distbackprop", "train", *COMMON,
                             "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stop_after_first_checkpoint(p: subprocess.Popen, out: Path, sig: int,
                                 timeout: float = 120) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    try:
        while not list_checkpoints(out) and time.monotonic() < deadline:
            assert p.poll() is None, p.communicate()[1][-2000:]
            time.sleep(0.05)
        assert list_checkpoints(out), "no checkpoint within the timeout"
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def _params(run: Path) -> np.ndarray:
    return load_model(run / "model.npz").params


def _check_interrupted(out: Path, total: int) -> int:
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "interrupted"
    assert 0 < s["steps"] < total
    for name in ("model.npz", "history.parquet", "config.yaml"):
        assert (out / name).exists(), name
    newest = list_checkpoints(out)[-1]
    verify_checkpoint(newest)
    assert newest.name == f"step-{s['steps']:08d}"  # the last commit, not an older one
    return s["steps"]


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_local_stop_saves_and_resume_is_bit_identical(tmp_path, sig, status):
    total = "5000"  # ~1900 steps/s here: the stop lands ~2 s before the run would end
    ref = run_cli("train", "--local", *COMMON, "--max-steps", total, "--out",
                  str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "run"
    code, err = _stop_after_first_checkpoint(_start(out, "--local", "--max-steps", total),
                                             out, sig)
    assert code == status, err[-2000:]
    assert f"--resume {out}" in err
    _check_interrupted(out, int(total))
    r = run_cli("train", "--local", *COMMON, "--max-steps", total, "--resume", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert np.array_equal(_params(out), _params(tmp_path / "ref"))


@pytest.mark.ray
def test_ray_driver_sigterm_saves_and_resume_is_bit_identical(tmp_path):
    total = "3000"
    ref = run_cli("train", "--workers", "2", *COMMON, "--max-steps", total, "--out",
                  str(tmp_path / "ref"), env={"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "run"
    code, err = _stop_after_first_checkpoint(
        _start(out, "--workers", "2", "--max-steps", total), out, signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert "SIGTERM received" not in err.replace("distbackprop: SIGTERM received", "")
    _check_interrupted(out, int(total))
    r = run_cli("train", "--workers", "2", *COMMON, "--max-steps", total, "--resume", "auto",
                "--out", str(out), env={"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(_params(out), _params(tmp_path / "ref"))


def test_resume_auto_starts_fresh_on_an_empty_directory(tmp_path):
    out = tmp_path / "new"
    r = run_cli("train", "--local", *COMMON, "--max-steps", "30", "--resume", "auto",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 30


def test_resume_auto_needs_out():
    r = run_cli("train", "--local", "--resume", "auto")
    assert r.returncode == 2
    assert "resume: 'auto' continues the run in --out DIR" in r.stderr


_IGNORING_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                    "os.execv(sys.executable, [sys.executable, '-m', 'distbackprop', "
                    "*sys.argv[1:]])")


def test_sigint_works_when_started_with_sigint_ignored(tmp_path):
    """A non-interactive shell's background job (`distbackprop train … &`) starts with
    SIGINT ignored (exec keeps it so); the CLI takes SIGINT back, so it still ends
    --metrics-linger with 130 after everything was written."""
    from ..metrics.promserver import free_port
    port = free_port()
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", _IGNORING_SIGINT, "train", "--local",
                          "--hidden", "8", "--epochs", "1", "--quiet", "--metrics-port",
                          str(port), "--metrics-linger", "120", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "summary.json").exists():
            assert p.poll() is None, p.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no summary.json within 120 s"
            time.sleep(0.1)
        sig_ign = int(next(line.split()[1] for line in
                           Path(f"/proc/{p.pid}/status").read_text().splitlines()
                           if line.startswith("SigIgn:")), 16)
        assert not sig_ign & (1 << (signal.SIGINT - 1)), "SIGINT still ignored"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
