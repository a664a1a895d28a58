"""`ray up` → `ray submit deploy/ray/train_job.py` → `ray down` through the cluster launcher.

Evidence for issue 7: deploy/ray/cluster.yaml, with only what names this machine
changed (the host list, the SSH login, the ports), brings up a Ray head over
SSH on 127.0.0.1 — sshd on loopback port 22, a dedicated unprivileged user, a key
generated here — whose setup commands build the venv and install the package;
`ray submit` then trains with 2 workers and token authentication on, a bad flag
comes back as a failed submit, and `ray down` stops that head.

The user's venv is built from the system Python (/usr/bin/python3): a venv made
from a Python under root's home directory is unreadable by another user.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from distbackprop.runtime.localcluster import stop_session
from tests.conftest import IN_CI
from tests.deploy.conftest import REPO, free_port, port_open, run, tool

pytestmark = pytest.mark.slow

USER = "dbpray"
SSH_PORT = 22
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _need(ok: bool, why: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: a missing prerequisite is a failure)")
        pytest.skip(why)


def _user_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture
def ssh_user(tmp_path):
    """A fresh unprivileged login `dbpray` with a generated key; yields (pw entry, key).

    The account is the test's own: everything running under its uid afterwards
    was started by this test, and is killed at the end.
    """
    _need(os.geteuid() == 0, "needs root to create a user and run sshd on port 22")
    _need(SYSTEM_PYTHON.exists(), f"{SYSTEM_PYTHON} is missing")
    for t in ("useradd", "ssh-keygen", "rsync", "ssh"):
        tool(t)
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        run(["useradd", "--create-home", "--shell", "/bin/bash", USER], timeout=60)
        pw = pwd.getpwnam(USER)
    for pid in _user_pids(pw.pw_uid):  # leftovers of an interrupted earlier run
        os.kill(pid, signal.SIGKILL)
    # "*" = no password, but not locked: sshd without PAM refuses locked accounts.
    run(["usermod", "-p", "*", USER], timeout=60)
    home = Path(pw.pw_dir)
    # From nothing every run: the launcher's setup commands build the venv.
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree("/etc/skel", home)
    key = tmp_path / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], timeout=60)
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    # Ray's temp dir (sockets, session logs, the address file `ray.init("auto")`
    # reads) apart from every other Ray instance on this machine.
    ray_tmp = Path(f"/tmp/dbp-{secrets.token_hex(4)}")
    with open(home / ".bashrc", "a") as rc:
        rc.write(f"export RAY_TMPDIR={ray_tmp}\n")
    run(["chown", "-R", f"{USER}:{pw.pw_gid}", str(home)], timeout=60)
    home.chmod(0o750)
    yield pw, key
    for pid in _user_pids(pw.pw_uid):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def sshd(tmp_path):
    """sshd on 127.0.0.1:22 for the test user only, with a host key made here."""
    sshd_bin = tool("sshd")
    _need(not port_open(SSH_PORT), f"127.0.0.1:{SSH_PORT} is already in use")
    hostkey = tmp_path / "ssh_host_ed25519_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], timeout=60)
    cfg = tmp_path / "sshd_config"
    cfg.write_text(
        f"Port {SSH_PORT}\nListenAddress 127.0.0.1\nHostKey {hostkey}\n"
        f"PidFile {tmp_path / 'sshd.pid'}\nAllowUsers {USER}\nPermitRootLogin no\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nAuthorizedKeysFile .ssh/authorized_keys\nMaxSessions 64\n"
        "MaxStartups 64\nPrintMotd no\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation dir
    log = open(tmp_path / "sshd.log", "w")  # closed in the finally below
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_open(SSH_PORT):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start:\n{(tmp_path / 'sshd.log').read_text()}")
            time.sleep(0.2)
        yield
    finally:
        stop_session(proc, grace=5)
        log.close()


def _test_cluster_config(tmp_path: Path, key: Path) -> Path:
    """deploy/ray/cluster.yaml with this machine's host list, login and free ports."""
    cfg = yaml.safe_load((REPO / "deploy/ray/cluster.yaml").read_text())
    cfg["cluster_name"] = f"dbp-{secrets.token_hex(3)}"
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {"ssh_user": USER, "ssh_private_key": str(key)}
    cfg.pop("max_workers", None)

    # Other Ray clusters run on this machine: every fixed port becomes a free one,
    # and this head keeps its sockets and address file in a temp dir of its own.
    def free(match: re.Match) -> str:
        if match.group(1) in ("min-worker-port", "max-worker-port"):
            return match.group(0)
        return f"--{match.group(1)}={free_port()}"

    head = [re.sub(r"--([a-z-]+port)=(\d+)", free, c) for c in cfg["head_start_ray_commands"]]
    assert any("RAY_AUTH_MODE=token ray start --head" in c for c in head), head
    cfg["head_start_ray_commands"] = head
    # `ray stop` (run by the start commands and by `ray down`) finds its targets
    # by process name; as this user it can only signal this user's processes.
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path


def test_ray_up_submit_down(ssh_user, sshd, wheelhouse, project_wheel, tmp_path):
    pw, key = ssh_user
    home = Path(pw.pw_dir)
    ray = tool("ray")
    started = time.monotonic()

    # Where `ray up` runs: ./dist holds the one wheel (cluster.yaml's file_mounts),
    # ~/.ray/auth_token the token it copies to the nodes.
    workdir = tmp_path / "launch"
    (workdir / "dist").mkdir(parents=True)
    shutil.copy2(project_wheel, workdir / "dist")
    client_home = tmp_path / "client-home"
    (client_home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (client_home / ".ray/auth_token").write_text(token)
    (client_home / ".ray/auth_token").chmod(0o600)

    # The node's own pip takes wheels from the cached wheelhouse (the index
    # would work too, only slower).
    cfg_path = _test_cluster_config(tmp_path, key)
    pipconf = home / ".config/pip/pip.conf"
    pipconf.parent.mkdir(parents=True)
    pipconf.write_text(f"[global]\nno-index = true\nfind-links = {wheelhouse}\n")
    run(["chown", "-R", f"{USER}:{pw.pw_gid}", str(home)], timeout=60)

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(client_home), RAY_TMPDIR=str(tmp_path / "client-ray"),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    common = dict(cwd=workdir, env=env)
    out = home / "runs/launcher"
    try:
        run([ray, "up", "-y", "--no-config-cache", "--disable-usage-stats",
                  "--log-style", "record", str(cfg_path)], timeout=900, **common)
        t_up = time.monotonic() - started
        # The setup commands made the venv from the system Python.
        assert (home / "venv/bin/python").resolve().parent == SYSTEM_PYTHON.parent

        run([ray, "submit", "--no-config-cache", "--disable-usage-stats",
                   "--log-style", "record", str(cfg_path), str(REPO / "deploy/ray/train_job.py"),
                   # 3 epochs at lr 1e-2: 0.96 val accuracy with seed 0 (0.94-0.98
                   # over seeds 0-4); the same global batches as one worker would take
                   "--", "--workers", "2", "--hidden", "32", "--epochs", "3", "--lr", "1e-2",
                   "--out", str(out), "--metrics-port", "0", "--quiet"],
                  timeout=600, **common)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["workers"] == 2 and summary["steps"] > 0
        assert summary["epochs"] == 3 and summary["val_accuracy"] >= 0.9, summary
        assert (out / "model.npz").exists()
        assert (home / ".ray/auth_token").read_text().strip() == token
        assert oct((home / ".ray/auth_token").stat().st_mode & 0o777) == "0o600"

        # The head enforces the token: a client on the node without it is refused.
        status = run([ray, "exec", "--no-config-cache", "--log-style", "record", str(cfg_path),
                      "RAY_AUTH_MODE=token ray status"], timeout=300, check=False, **common)
        refused = run([ray, "exec", "--no-config-cache", "--log-style", "record", str(cfg_path),
                       "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=" + "0" * 64 + " ray status"],
                      timeout=300, check=False, **common)
        assert status.returncode == 0, status.stdout[-3000:] + status.stderr[-3000:]
        assert refused.returncode != 0, refused.stdout[-3000:]
        assert "InvalidAuthToken" in refused.stdout + refused.stderr

        # A configuration error on the node comes back as a failed submit.
        bad = run([ray, "submit", "--no-config-cache", "--log-style", "record", str(cfg_path),
                   str(REPO / "deploy/ray/train_job.py"), "--", "--workers", "0",
                   "--out", str(home / "runs/bad")], timeout=300, check=False, **common)
        assert bad.returncode != 0
        assert "distbackprop: error: workers" in bad.stdout + bad.stderr
        t_submit = time.monotonic() - started - t_up
    finally:
        down = run([ray, "down", "-y", "--log-style", "record", str(cfg_path)],
                   timeout=300, check=False, **common)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    # `ray down` ran `ray stop` on the head: none of the user's Ray processes is left.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = _ray_processes(pw.pw_uid)
        if not left:
            break
        time.sleep(1)
    assert not left, left
    print(f"\nray up {t_up:.0f} s, submits {t_submit:.0f} s, total "
          f"{time.monotonic() - started:.0f} s")


def _ray_processes(uid: int) -> list[str]:
    names = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(s in cmd for s in ("raylet", "gcs_server", "ray::", "dashboard.py")):
            names.append(cmd[:120])
    return names
