"""A real Prometheus server for tests: config from deploy/, start, poll, query, stop by PID.

Usage (the end-to-end test reuses this)::

    binary = require_tool("prometheus")
    cfg = render_config(tmp_path, targets=[f"127.0.0.1:{exporter.port}"])
    with PrometheusServer(binary, cfg, tmp_path / "tsdb") as prom:
        prom.wait_target_up("distbackprop", timeout=60)
        prom.wait_for("distbackprop_grad_norm", lambda r: len(r) == n_layers)
        result = prom.query("distbackprop_grad_norm")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY_PROMETHEUS = REPO / "deploy" / "prometheus"
JOB = "distbackprop"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def render_config(dest_dir: str | os.PathLike, targets: Sequence[str],
                  scrape_interval: str = "1s", job: str = JOB,
                  template: str | os.PathLike = DEPLOY_PROMETHEUS / "prometheus.yml") -> Path:
    """Copy the repo's prometheus.yml into `dest_dir` with job `job` scraping `targets`
    every `scrape_interval` and its rule files referenced by absolute path."""
    template = Path(template)
    cfg = yaml.safe_load(template.read_text())
    cfg.setdefault("global", {})
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["evaluation_interval"] = scrape_interval
    cfg["rule_files"] = [str((template.parent / f).resolve()) for f in cfg.get("rule_files", [])]
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == job]
    if len(jobs) != 1:
        raise AssertionError(f"{template}: expected one scrape job {job!r}, found {len(jobs)}")
    jobs[0]["static_configs"] = [{"targets": list(targets)}]
    jobs[0]["scrape_interval"] = scrape_interval
    dest = Path(dest_dir) / "prometheus.yml"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


class PrometheusServer:
    """One `prometheus` process on 127.0.0.1:`port` with its own storage directory."""

    def __init__(self, binary: str, config_file: str | os.PathLike,
                 storage_dir: str | os.PathLike, port: int | None = None,
                 host: str = "127.0.0.1"):
        self.binary = binary
        self.config_file = Path(config_file)
        self.storage_dir = Path(storage_dir)
        self.host = host
        self.port = port or free_port(host)
        self.log_path = self.storage_dir.parent / f"prometheus-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---------------------------------------------------------------- process
    def start(self, timeout: float = 60) -> PrometheusServer:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config_file}",
             f"--storage.tsdb.path={self.storage_dir}",
             f"--web.listen-address={self.host}:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 15 s; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ---------------------------------------------------------------- HTTP
    def _get(self, path: str, params: dict | None = None, timeout: float = 10) -> bytes:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read()

    def api(self, path: str, params: dict | None = None) -> dict | list:
        """GET /api/v1/`path`; returns ``data`` or raises AssertionError with the error."""
        try:
            body = json.loads(self._get(f"/api/v1/{path}", params))
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; the vector/matrix result list (scalars as one-element list)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        data = self.api("query_range", {"query": expr, "start": f"{start:.3f}",
                                        "end": f"{end:.3f}", "step": str(step)})
        return data["result"]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n"
                                     f"{self.log_tail()}")
            try:
                if self._get("/-/ready", timeout=2).strip():
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout} s:\n{self.log_tail()}")

    def wait_target_up(self, job: str = JOB, timeout: float = 60) -> dict:
        """Poll /api/v1/targets until every target of `job` has health "up"."""
        deadline = time.monotonic() + timeout
        last: list = []
        while time.monotonic() < deadline:
            last = [t for t in self.api("targets")["activeTargets"]
                    if t["labels"].get("job") == job]
            if last and all(t["health"] == "up" for t in last):
                return last[0]
            time.sleep(0.5)
        raise AssertionError(f"target {job!r} not up after {timeout} s: {last}\n"
                             f"{self.log_tail()}")

    def wait_for(self, expr: str, predicate: Callable[[list[dict]], bool],
                 timeout: float = 30) -> list[dict]:
        """Poll an instant query until `predicate(result)` holds; return that result."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"{expr!r}: condition not met after {timeout} s; last {result}")


__all__ = ["DEPLOY_PROMETHEUS", "JOB", "PrometheusServer", "free_port", "render_config"]
