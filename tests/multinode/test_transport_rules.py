"""The transport decision and the located PIDs, without a cluster (fast)."""

from __future__ import annotations

import os
import pickle

from distbackprop.comm.transport import (
    PROC_IPC_INIT_INO,
    PROC_PID_INIT_INO,
    TCP_ONLY,
    apply_transport_env,
    process_identity,
    transport_env,
)
from distbackprop.runtime.group import ActorPid

HOST = {"boot_id": "b", "pid_ns": PROC_PID_INIT_INO, "ipc_ns": PROC_IPC_INIT_INO}
CONTAINER_HOST_IPC = {"boot_id": "b", "pid_ns": 4026532001, "ipc_ns": PROC_IPC_INIT_INO}
CONTAINER_OWN_IPC = {"boot_id": "b", "pid_ns": 4026532001, "ipc_ns": 4026532002}


def test_host_process_keeps_the_defaults():
    assert transport_env(me=HOST, environ={}) == {}


def test_child_pid_namespace_in_the_host_ipc_namespace_uses_tcp():
    assert transport_env(me=CONTAINER_HOST_IPC, environ={}) == TCP_ONLY


def test_private_ipc_namespace_keeps_the_defaults():
    assert transport_env(me=CONTAINER_OWN_IPC, environ={}) == {}


def test_an_explicit_ucx_tls_wins():
    assert transport_env(me=CONTAINER_HOST_IPC, environ={"UCX_TLS": "all"}) == {}


def test_peers_sharing_a_nested_ipc_namespace_across_pid_namespaces_use_tcp():
    me = {"boot_id": "b", "pid_ns": 11, "ipc_ns": 20}
    same_ns = {"boot_id": "b", "pid_ns": 11, "ipc_ns": 20}
    other_pid = {"boot_id": "b", "pid_ns": 12, "ipc_ns": 20}
    other_machine = {"boot_id": "c", "pid_ns": 12, "ipc_ns": 20}
    assert transport_env([me, same_ns], me=me, environ={}) == {}
    assert transport_env([me, other_machine], me=me, environ={}) == {}
    assert transport_env([me, other_pid], me=me, environ={}) == TCP_ONLY


def test_process_identity_reads_this_process():
    ident = process_identity()
    assert ident["pid_ns"] == os.stat("/proc/self/ns/pid").st_ino
    assert ident["ipc_ns"] == os.stat("/proc/self/ns/ipc").st_ino
    assert ident["boot_id"]


def test_apply_sets_the_environment(monkeypatch):
    monkeypatch.delenv("DISTBACKPROP_TEST_TRANSPORT", raising=False)
    apply_transport_env({"DISTBACKPROP_TEST_TRANSPORT": "x"})
    assert os.environ["DISTBACKPROP_TEST_TRANSPORT"] == "x"
    monkeypatch.delenv("DISTBACKPROP_TEST_TRANSPORT")


def test_actor_pid_is_an_int_that_keeps_its_location():
    p = ActorPid(4321, "ab" * 28, {"pid_ns": 7})
    q = pickle.loads(pickle.dumps(p))
    assert q == 4321 and isinstance(q, int) and isinstance(q, ActorPid)
    assert (q.node_id, q.identity) == ("ab" * 28, {"pid_ns": 7})
    # psutil and /proc paths format PIDs with str(): it must be the bare number.
    assert str(q) == repr(q) == f"{q}" == "4321"
