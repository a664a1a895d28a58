"""deploy/docker-compose.yml, parsed and checked (no Docker engine runs here).

Every file it references exists, every published port is bound to loopback,
the token comes from the uncommitted deploy/.env, the services agree with each
other on ports, and the Prometheus config it mounts passes `promtool check config`
together with the alert rules it loads.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import REPO, run, tool

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _defaults(text: str) -> str:
    """Compose interpolation with every variable unset: ${X:-d} → d, ${X:?e} → <X>."""
    def sub(m: re.Match) -> str:
        op, arg = m.group(2), m.group(3)
        if op in (":-", "-"):
            return arg
        return f"<{m.group(1)}>"
    return VAR.sub(sub, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _command(svc: dict) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(_defaults(cmd)) if isinstance(cmd, str) else [_defaults(c) for c in cmd]


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_services_present(compose):
    assert set(compose["services"]) == {"ray-head", "ray-worker", "trainer", "prometheus",
                                        "grafana"}
    assert "replicas" in compose["services"]["ray-worker"]["deploy"]  # scalable


def test_every_referenced_file_exists(compose):
    checked = 0
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            ctx = (DEPLOY / build["context"]).resolve()
            assert (ctx / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert ctx == REPO
            checked += 1
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
                checked += 1
        for env_file in svc.get("env_file", []) or []:
            raise AssertionError(f"{name}: env_file {env_file}: secrets come from ${{VAR}} "
                                 "in deploy/.env, so that a service sees only its own")
        for cfg in svc.get("configs", []):
            assert cfg["source"] in compose["configs"], name
    assert checked >= 5
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    # The dashboards directory is mounted where the provisioning file looks.
    grafana_vols = compose["services"]["grafana"]["volumes"]
    assert (f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro"
            in grafana_vols)
    assert list((DEPLOY / "grafana/dashboards").glob("*.json"))


def test_published_ports_are_loopback_only(compose):
    published = 0
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert _defaults(str(port)).startswith("127.0.0.1:"), (name, port)
                assert len(_defaults(str(port)).split(":")) == 3, (name, port)
            published += 1
        assert svc.get("network_mode") != "host", name
    assert published == 3  # the Ray dashboard, Prometheus, Grafana


def test_token_comes_from_the_uncommitted_env_file(compose):
    text = COMPOSE.read_text()
    required = {m.group(1) for m in VAR.finditer(text) if m.group(2) in (":?", "?")}
    assert {"RAY_AUTH_TOKEN", "GRAFANA_ADMIN_PASSWORD"} <= required
    example = (DEPLOY / ".env.example").read_text()
    for var in required:
        assert re.search(rf"^{var}=$", example, re.M), f"{var} missing from .env.example"
    # Every variable the file uses is documented in the example.
    for var in {m.group(1) for m in VAR.finditer(text)}:
        assert var in example, var
    assert "deploy/.env" in (REPO / ".gitignore").read_text().split()
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=REPO)
    assert ignored.returncode != 1  # 0: ignored; 128: not a git checkout
    # Every Ray process and the job client authenticate with the token.
    for name in ("ray-head", "ray-worker", "trainer"):
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name


def test_services_agree_on_ports(compose):
    s = compose["services"]
    head, worker, trainer = (_command(s[n]) for n in ("ray-head", "ray-worker", "trainer"))
    assert head[:3] == ["start", "--head", "--block"]
    gcs = _flag(head, "port")
    assert _flag(worker, "address") == f"ray-head:{gcs}"
    assert s["ray-head"]["healthcheck"]["test"][-1] == f"127.0.0.1:{gcs}"
    assert _flag(trainer, "address") == f"http://ray-head:{_flag(head, 'dashboard-port')}"
    assert _defaults(s["ray-head"]["ports"][0]).endswith(f":{_flag(head, 'dashboard-port')}")
    # The trainer's entrypoint is a real `distbackprop train` invocation.
    train = trainer[trainer.index("--") + 1:]
    assert train[:2] == ["distbackprop", "train"]
    assert _flag(train, "metrics-host") == "0.0.0.0"

    prom = yaml.safe_load(compose["configs"]["prometheus_config"]["content"])
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["distbackprop"]["static_configs"][0]["targets"] == [
        f"ray-head:{_flag(train, 'metrics-port')}"]
    ray_metrics = _flag(head, "metrics-export-port")
    assert _flag(worker, "metrics-export-port") == ray_metrics
    assert jobs["ray"]["static_configs"][0]["targets"] == [f"ray-head:{ray_metrics}"]
    assert jobs["ray"]["dns_sd_configs"][0] == {"names": ["ray-worker"], "type": "A",
                                                "port": int(ray_metrics)}


def test_grafana_datasource_matches_the_dashboard(compose):
    ds = yaml.safe_load(compose["configs"]["grafana_datasource"]["content"])["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    for path in (DEPLOY / "grafana/dashboards").glob("*.json"):
        refs = re.findall(r'"datasource":\s*\{[^{}]*"uid":\s*"([^"]+)"',
                          json.dumps(json.loads(path.read_text())))
        prometheus_refs = {uid for uid in refs if not uid.startswith("-- ")}
        assert prometheus_refs == {ds["uid"]}, path.name
    local = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
                           .read_text())["datasources"][0]
    assert ds["uid"] == local["uid"] and ds["type"] == local["type"]


def test_prometheus_config_passes_promtool(compose, tmp_path):
    """promtool checks the config the compose file mounts, with the files it mounts."""
    promtool = tool("promtool")
    svc = compose["services"]["prometheus"]
    (mount,) = [c for c in svc["configs"] if c["source"] == "prometheus_config"]
    etc = Path(mount["target"]).parent
    config = tmp_path / Path(mount["target"]).name
    config.write_text(compose["configs"]["prometheus_config"]["content"])
    copied = []
    for vol in svc["volumes"]:
        source, target = vol.split(":")[:2]
        if source.startswith(".") and Path(target).parent == etc:
            shutil.copy(DEPLOY / source, tmp_path / Path(target).name)
            copied.append(Path(target).name)
    prom = yaml.safe_load(config.read_text())
    assert prom["rule_files"] == ["alerts.yml"] and copied == ["alerts.yml"]
    res = run([promtool, "check", "config", str(config)], timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr
    # The rules file really was read (promtool reports its rule count).
    assert re.search(r"SUCCESS: \d+ rules found", res.stdout + res.stderr)
