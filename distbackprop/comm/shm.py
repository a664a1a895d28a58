"""Memory every rank of a communicator maps, when all of them run on one machine.

Ranks on one machine need not copy buffers through MPI to combine them: they can read
each other's. `map_shared` (collective) gives every rank a mapping of one file in
``/dev/shm``, or None on every rank when they are not all on one machine (host name,
boot id and the ``/dev/shm`` device differ), or some rank cannot open the file (another
mount namespace), or there is no room. Rank 0 creates the file under a random name and
unlinks it as soon as every rank has mapped it, so nothing is left behind whoever dies
later; the memory goes with the last mapping.

Ordering is the caller's: these are plain loads and stores, fenced by the collectives
the caller runs (a barrier or an allreduce orders memory on every rank that takes part).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from distbackprop.comm.base import Communicator

SHM_ROOT = Path("/dev/shm")
PREFIX = "distbackprop-node-"
NAME_BYTES = 128  # room for the file's path in the broadcast
STALE_SECONDS = 60.0  # a file older than this whose creator is gone was left by a SIGKILL
MARGIN = 64 << 20  # bytes of /dev/shm left to everyone else (Ray's object store lives there)


def machine_id() -> int:
    """63 bits naming this machine as the ranks see it: host name (a UTS namespace is a
    machine of its own here), boot id and the device of ``/dev/shm``."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat(SHM_ROOT).st_dev))
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def same_machine(comm: Communicator) -> bool:
    """Whether every rank has this rank's `machine_id` (collective; same answer on all):
    one MAX-allreduce of [id, −id] gives the largest and the smallest."""
    mid = machine_id()
    buf = np.array([mid, -mid], dtype=np.int64)
    comm.allreduce_(buf, op="max")
    return int(buf[0]) == -int(buf[1])


def map_shared(comm: Communicator, nbytes: int, root: Path = SHM_ROOT) -> mmap.mmap | None:
    """One zero-filled shared mapping of `nbytes` on every rank, or None on every rank.

    Collective. Size-1 communicators get None (nothing to share)."""
    if comm.size == 1 or not same_machine(comm):
        return None
    name = np.zeros(NAME_BYTES, np.uint8)
    path: Path | None = None
    if comm.rank == 0:
        remove_stale(root)
        path = _create(root, nbytes)
        if path is not None:
            raw = str(path).encode()
            name[:len(raw)] = np.frombuffer(raw, np.uint8)
    comm.bcast_(name, root=0)
    text = bytes(name).rstrip(b"\0").decode()
    mm = _open(Path(text), nbytes) if text else None
    ok = np.array([0.0 if mm is None else 1.0])
    comm.allreduce_(ok, op="min")  # every rank has opened the file, or given up
    if comm.rank == 0 and path is not None:
        with contextlib.suppress(OSError):
            path.unlink()
    if ok[0] < 1.0:
        if mm is not None:
            mm.close()
        return None
    return mm


def _create(root: Path, nbytes: int) -> Path | None:
    """A new file of `nbytes` with its pages allocated (so a full /dev/shm fails here, not
    with a SIGBUS mid-step), or None — also when it would leave less than `MARGIN` free."""
    path = root / f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    try:
        if shutil.disk_usage(root).free < nbytes + MARGIN:
            return None
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    finally:
        os.close(fd)
    return path


def _open(path: Path, nbytes: int) -> mmap.mmap | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != nbytes:
            return None
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, nbytes, flags=flags)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def remove_stale(root: Path = SHM_ROOT) -> None:
    """Remove files a SIGKILLed rank 0 left between creating and unlinking them: older than
    `STALE_SECONDS` and made by a PID that is gone."""
    now = time.time()
    with contextlib.suppress(OSError):
        for p in root.glob(f"{PREFIX}*"):
            pid = p.name[len(PREFIX):].split("-")[0]
            with contextlib.suppress(OSError):
                if pid.isdigit() and now - p.stat().st_mtime > STALE_SECONDS \
                        and not pid_alive(int(pid)):
                    p.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists in this PID namespace (one we may not signal too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["map_shared", "machine_id", "pid_alive", "remove_stale", "same_machine"]
