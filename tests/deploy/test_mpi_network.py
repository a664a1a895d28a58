"""The MPI settings deploy/README.md gives for several nodes do what it says.

Two ranks form their group the way Ray actors do (distbackprop.comm.mpi's
open_ports/join rendezvous), with the interface and the port range chosen by
environment variables: for the default UCX netmod of the `mpich` wheel, and for
the OFI netmod's tcp provider. Every socket a rank listens on must be on the
chosen interface (loopback here) and inside the chosen range, and the allreduce
across the pair must be right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import require_module
from tests.deploy.conftest import REPO

LOW, HIGH = 47100, 47199

SETTINGS = {
    "ucx": {"UCX_NET_DEVICES": "lo", "UCX_TLS": "tcp,self",
            "UCX_TCP_PORT_RANGE": f"{LOW}-{HIGH}"},
    "ofi-tcp": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo",
                "FI_TCP_PORT_LOW_RANGE": str(LOW), "FI_TCP_PORT_HIGH_RANGE": str(HIGH)},
}


@pytest.mark.mpi
@pytest.mark.parametrize("netmod", sorted(SETTINGS))
def test_interface_and_port_range_are_honoured(netmod, tmp_path):
    require_module("mpi4py")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UCX_", "FI_", "MPIR_CVAR_"))}
    env.update(SETTINGS[netmod])
    cmd = [sys.executable, "-m", "tests.deploy.mpi_peer"]
    rank0 = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    rank1 = None
    try:
        port = json.loads(rank0.stdout.readline())["port"]
        portfile = tmp_path / "port"
        portfile.write_text(port)
        rank1 = subprocess.Popen([*cmd, str(portfile)], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outs = [p.communicate(timeout=90) for p in (rank0, rank1)]
    finally:
        for p in (rank0, rank1):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip((rank0, rank1), outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["sum"] == 3.0
        assert report["listening"], "no listening socket: MPI did not use TCP"
        for addr in report["listening"]:
            host, port_no = addr.rsplit(":", 1)
            assert host == "127.0.0.1", (netmod, report["listening"])
            assert LOW <= int(port_no) <= HIGH, (netmod, report["listening"])
