"""`ray job submit` against a real `ray start --head` with token authentication.

Evidence for issue 7: a 2-worker training job submitted through the job API
(with --working-dir and a runtime env) ends SUCCEEDED with a valid summary.json,
its coordinator serves Prometheus metrics on the head node while it runs, and
the same submission without the token, or with a wrong one, is refused.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from distbackprop.runtime.localcluster import stop_session
from tests.deploy.conftest import free_port, run, tool

pytestmark = pytest.mark.slow

HEAD_PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                   "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port")


def _client_env(home: Path, **extra: str) -> dict[str, str]:
    """A Ray client environment with no token from this machine's own ~/.ray."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


def _http(url: str, token: str | None = None, timeout: float = 5) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on loopback ports of its own, token auth on.

    Yields (dashboard URL, token). Stopped by signalling the `ray start` process
    and then killing whatever is left of its session (GCS, raylet, dashboard,
    workers) — never a machine-wide `ray stop`.
    """
    ray = tool("ray")
    token = secrets.token_hex(32)
    token_file = tmp_path / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    ports = {flag: free_port() for flag in HEAD_PORT_FLAGS}
    # Ray's AF_UNIX sockets live under the temp dir: keep its path short.
    temp_dir = Path(f"/tmp/dbp-{secrets.token_hex(4)}")
    # The head finds its token in a file, as on a real node; the job driver and
    # the training workers inherit both variables from it.
    env = _client_env(tmp_path / "head-home", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN_PATH=str(token_file))
    # The job entrypoint `distbackprop` is a console script of this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [ray, "start", "--head", "--block", "--num-cpus", "4",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [f"--{flag}", str(port)]
    log = open(tmp_path / "ray-head.log", "w")  # closed in the finally below
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}:\n"
                            f"{(tmp_path / 'ray-head.log').read_text()[-4000:]}")
            try:
                if _http(f"{url}/api/jobs/", token)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray head's job API did not come up in 120 s")
            time.sleep(1)
        yield url, token, ports["port"]
    finally:
        stop_session(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_cmd(url: str, workdir: Path, out: Path, metrics_port: int) -> list[str]:
    runtime_env = {"working_dir": str(workdir),
                   "env_vars": {"OMP_NUM_THREADS": "1", "DISTBACKPROP_TEST_MARK": "ray-job"}}
    return [tool("ray"), "job", "submit", "--address", url,
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "distbackprop", "train", "--config", "train.yaml", "--workers", "2",
            "--out", str(out), "--metrics-port", str(metrics_port),
            "--metrics-linger", "15", "--quiet"]


def test_job_submit_trains_with_token_and_is_refused_without(ray_head, tmp_path):
    url, token, gcs_port = ray_head
    started = time.monotonic()
    # The working dir travels to the cluster; the entrypoint runs inside it, so
    # the config file is found by its relative name.
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "train.yaml").write_text("hidden: [32]\nepochs: 3\nbatch_size: 64\nseed: 3\n")
    out = tmp_path / "run"
    metrics_port = free_port()
    cmd = _submit_cmd(url, workdir, out, metrics_port)

    # Without the token, and with a wrong one: refused before anything runs.
    nohome = tmp_path / "client-without-token"
    for env in (_client_env(nohome, RAY_AUTH_MODE="disabled"),
                _client_env(nohome, RAY_AUTH_MODE="token",
                            RAY_AUTH_TOKEN=secrets.token_hex(32))):
        refused = run(cmd, env=env, timeout=120, check=False)
        assert refused.returncode != 0, refused.stdout
        assert "AuthenticationError" in refused.stderr + refused.stdout
    assert not out.exists()
    assert _http(f"{url}/api/jobs/")[0] == 401
    assert _http(f"{url}/api/jobs/", token="0" * 64)[0] == 403
    status, body = _http(f"{url}/api/jobs/", token)
    assert status == 200 and json.loads(body) == []

    # With the token: the job runs, and its coordinator serves metrics on the head.
    env = _client_env(tmp_path / "client", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    scraped = None
    try:
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            if (out / "summary.json").exists() and scraped is None:
                # summary.json is written before the exporter's linger starts.
                scraped = _http(f"http://127.0.0.1:{metrics_port}/metrics")
            time.sleep(0.2)
        output, _ = job.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, output[-6000:]
    assert "succeeded" in output

    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2
    assert summary["epochs"] == 3
    assert summary["steps"] > 0
    assert summary["restarts"] == 0
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_second", "wall_seconds"):
        assert isinstance(summary[key], float) and summary[key] == summary[key], key
    assert (out / "model.npz").exists() and (out / "history.parquet").exists()

    assert scraped is not None and scraped[0] == 200
    steps = [line for line in scraped[1].splitlines()
             if line.startswith("distbackprop_steps_total ")]
    assert steps and float(steps[0].split()[1]) == summary["steps"]

    # The job API agrees, read back with the token.
    status, body = _http(f"{url}/api/jobs/", token)
    jobs = json.loads(body)
    assert status == 200 and [j["status"] for j in jobs] == ["SUCCEEDED"]
    assert jobs[0]["runtime_env"]["env_vars"]["DISTBACKPROP_TEST_MARK"] == "ray-job"

    # `ray health-check` (the compose file's healthcheck) passes only with the token.
    check = [tool("ray"), "health-check", "--address", f"127.0.0.1:{gcs_port}"]
    assert run(check, env=env, timeout=60, check=False).returncode == 0
    wrong = _client_env(nohome, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert run(check, env=wrong, timeout=60, check=False).returncode != 0
    print(f"ray job submit test: {time.monotonic() - started:.1f} s after the head was up")


def _submit(cmd: list[str], env: dict[str, str], timeout: float
            ) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head says its job agent is not up yet (the job
    API answers before the agent registers; Ray asks to "try again later")."""
    deadline = time.monotonic() + 90
    while True:
        r = run(cmd, env=env, timeout=timeout, check=False)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr \
                or time.monotonic() > deadline:
            return r
        time.sleep(2)


def test_job_stop_saves_the_run_and_resume_continues(ray_head, tmp_path):
    """`ray job stop` sends SIGTERM: the job ends STOPPED with everything saved, and the
    same command line with `--resume auto` finishes the run."""
    url, token, _ = ray_head
    env = _client_env(tmp_path / "client", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    out = tmp_path / "run"
    # Ray SIGKILLs a stopped job after RAY_JOB_STOP_WAIT_TIME_S (default 3 s); give the
    # save room on a loaded machine (deploy/README.md says the same for real clusters).
    # Every step takes ≥ 5 ms (the test-only slow_ms fault), so the run is still going
    # when the stop comes after its first checkpoint, however fast the machine.
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "RAY_JOB_STOP_WAIT_TIME_S": "60",
                                "DISTBACKPROP_TEST_FAULTS": json.dumps({"slow_ms": 5})}}
    train = ["distbackprop", "train", "--workers", "2", "--hidden", "16", "--max-steps",
             "2000", "--chunk-steps", "20", "--checkpoint-every", "200", "--out", str(out),
             "--metrics-port", "0", "--quiet", "--resume", "auto"]
    sub = _submit([tool("ray"), "job", "submit", "--address", url, "--no-wait",
                   "--runtime-env-json", json.dumps(runtime_env), "--", *train],
                  env=env, timeout=120)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", sub.stdout + sub.stderr).group(0)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    stop = run([tool("ray"), "job", "stop", "--address", url, job_id], env=env, timeout=120,
               check=False)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    while True:
        _, body = _http(f"{url}/api/jobs/{job_id}", token)
        status = json.loads(body)["status"]
        if status not in ("PENDING", "RUNNING"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status == "STOPPED"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 2000
    assert (out / "checkpoints" / f"step-{summary['steps']:08d}" / "manifest.json").exists()
    assert (out / "model.npz").exists() and (out / "history.parquet").exists()
    logs = run([tool("ray"), "job", "logs", "--address", url, job_id], env=env, timeout=60,
               check=False).stdout
    assert f"stopped at step {summary['steps']}" in logs
    # The same command line again (a scheduler's retry) continues to the end.
    again = _submit([tool("ray"), "job", "submit", "--address", url,
                     "--runtime-env-json", json.dumps(runtime_env), "--", *train],
                    env=env, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:]
    done = json.loads((out / "summary.json").read_text())
    assert done["status"] == "finished" and done["steps"] == 2000
