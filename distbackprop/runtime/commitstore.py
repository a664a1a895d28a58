"""Commits through shared memory when rank 0 shares the coordinator's machine.

Putting the reference MLP's training state (params + Adam's m and v, 22 MB) into
Ray's object store costs rank 0 ~25–30 ms here, while copying it into memory that is
already mapped costs ~4 ms; every commit used to stall the whole group for the
difference. So when rank 0 runs on the coordinator's node and sees the same
``/dev/shm``, the coordinator makes a `CommitStore` directory there and rank 0
writes each commit into one of two slot files, mapped once (a `SlotWriter`), and
returns only a small `SharedState` descriptor. When every rank is on that machine,
each maps the slots too (`SlotWriter.attach`) and writes its own block of each commit
(`begin(mark=False)`), in parallel; rank 0 marks the slot torn first and seals it
(`finish`) after a barrier. The coordinator copies the arrays
out (in its commit-pull thread, while the next chunk computes).

Two slots alternate, so writing commit n+1 never touches commit n; a slot is
reused for commit n+2 only after the coordinator has collected commit n+1. Each
slot starts with a sequence number that the writer sets to 0 before writing and
to the commit's number after; a reader checks it before and after copying, so a
slot overwritten under it (or half written by a worker that died) reads as
`CommitGone`, never as a wrong state. Elsewhere (rank 0 on another machine, or a
``/dev/shm`` that is not shared) commits go through Ray's object store as before.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..comm.shm import MARGIN, pid_alive

SHM_ROOT = Path("/dev/shm")
PREFIX = "distbackprop-commits-"
HEADER = 64  # bytes before the arrays: the slot's sequence number (int64), then padding
TOKEN = "token"


class NoRoom(OSError):
    """Not enough room in the shared-memory filesystem for the two slots."""


class CommitGone(RuntimeError):
    """The slot no longer holds the commit a descriptor names (overwritten, or torn)."""


Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]  # (key, dtype, shape, offset)


def layout_of(state: dict[str, np.ndarray]) -> tuple[Layout, int]:
    """Where each array of `state` goes in a slot (64-byte aligned), and the slot's size."""
    out, offset = [], HEADER
    for key, a in state.items():
        out.append((key, a.dtype.str, tuple(a.shape), offset))
        offset += -(-a.nbytes // 64) * 64
    return tuple(out), offset


@dataclass(frozen=True)
class SharedState:
    """Names commit `seq` in slot `slot` of a store; small, so it travels through Ray."""

    directory: str
    slot: int
    seq: int
    layout: Layout

    def read(self) -> dict[str, np.ndarray]:
        """Copies of the arrays; `CommitGone` if the slot no longer holds commit `seq`."""
        path = Path(self.directory) / f"slot{self.slot}"
        try:
            mm = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise CommitGone(f"commit {self.seq}: {path}: {exc}") from None
        seq = mm[:8].view(np.int64)
        if int(seq[0]) != self.seq:
            raise CommitGone(f"commit {self.seq}: slot {self.slot} holds {int(seq[0])}")
        out = {}
        for key, dtype, shape, offset in self.layout:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            out[key] = mm[offset:offset + n].view(dtype).reshape(shape).copy()
        if int(seq[0]) != self.seq:  # overwritten while copying
            raise CommitGone(f"commit {self.seq}: slot {self.slot} rewritten during the read")
        del mm
        return out


class SlotWriter:
    """Rank 0's side: writes whole states into the store's two slots, alternately."""

    def __init__(self, directory: str, first_seq: int = 1):
        self.directory = Path(directory)
        self._maps: list[np.memmap] = []
        self._layout: Layout | None = None
        self._seq = first_seq - 1

    def prepare(self, state: dict[str, np.ndarray]) -> None:
        """Map both slots for states shaped like `state` now (at group start), so the first
        commit does not pay for creating and touching them mid-training."""
        layout, size = layout_of(state)
        self._map(size)
        self._layout = layout

    def attach(self, state: dict[str, np.ndarray]) -> None:
        """Map both slots that rank 0's `prepare` made for states shaped like `state`, to
        write blocks of each commit into them (every rank of a group on one machine)."""
        layout, size = layout_of(state)
        maps = []
        for i in range(2):
            path = self.directory / f"slot{i}"
            if path.stat().st_size != size:
                raise NoRoom(f"{path}: {path.stat().st_size} bytes, expected {size}")
            mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
            # Map every page now (a write fault each; rank 0 has just zeroed the slots and
            # no commit is in them yet), not in the first commits: ~2800 faults per slot
            # for the reference MLP cost a rank ~3 ms of each of its first two commits.
            mm[::mmap.PAGESIZE] = 0
            maps.append(mm)
        self._maps, self._layout = maps, layout

    def write(self, state: dict[str, np.ndarray]) -> SharedState:
        """Copy `state` into the slot not holding the previous commit; its descriptor."""
        layout, size = layout_of(state)
        if layout != self._layout:
            self._map(size)
            self._layout = layout
        for a, b in zip(self.begin().values(), state.values(), strict=True):
            a[...] = b
        return self.finish()

    def begin(self, mark: bool = True) -> dict[str, np.ndarray]:
        """The next commit's arrays (shaped as `prepare`'s state), views into the slot not
        holding the previous commit, marked torn until `finish` (`mark`: the writer that
        seals it; the other ranks of a split commit only write): the caller writes the
        state straight into them."""
        if self._layout is None:
            raise RuntimeError("SlotWriter.begin before prepare")
        self._seq += 1
        mm = self._maps[self._seq % 2]
        if mark:
            mm[:8].view(np.int64)[0] = 0  # torn until the arrays are all in
        return {key: mm[offset:offset + int(np.prod(shape, dtype=np.int64))
                        * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
                for key, dtype, shape, offset in self._layout}

    def finish(self) -> SharedState:
        """Seal the commit `begin` opened; its descriptor."""
        slot = self._seq % 2
        self._maps[slot][:8].view(np.int64)[0] = self._seq
        return SharedState(str(self.directory), slot, self._seq, self._layout)

    def _map(self, size: int) -> None:
        """(Re)create both slot files at `size` bytes, every page touched once now (so a
        full tmpfs can never turn a later write into SIGBUS). Raises `NoRoom` when
        ``/dev/shm`` lacks room for both slots plus a margin (a container's is often 64 MB):
        the caller then commits through Ray's object store."""
        self._maps = []
        for i in range(2):
            (self.directory / f"slot{i}").unlink(missing_ok=True)
        free = shutil.disk_usage(self.directory).free
        if free < 2 * size + MARGIN:
            raise NoRoom(f"{self.directory}: {free} bytes free, the commit slots need "
                         f"2 × {size} + {MARGIN}")
        for i in range(2):
            path = self.directory / f"slot{i}"
            with open(path, "wb") as f:
                f.truncate(size)
            mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
            mm[:] = 0
            self._maps.append(mm)


class CommitStore:
    """The coordinator's side: a private directory under /dev/shm, removed by `close()`."""

    def __init__(self, root: Path = SHM_ROOT):
        remove_stale(root)
        self.path = root / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path.mkdir(mode=0o700)
        self.token = secrets.token_hex(16)
        (self.path / TOKEN).write_text(self.token)
        self._generation = 0

    @classmethod
    def create(cls, root: Path = SHM_ROOT) -> CommitStore | None:
        """A store, or None where there is no usable shared-memory directory."""
        try:
            return cls(root)
        except OSError:
            return None

    def first_seq(self) -> int:
        """The first commit number for the next group's rank 0: groups never reuse one."""
        self._generation += 1
        return self._generation << 32

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def sees(directory: str, token: str) -> bool:
    """Whether this process sees the store the coordinator made (same machine and mounts)."""
    try:
        return (Path(directory) / TOKEN).read_text() == token
    except OSError:
        return False


def remove_stale(root: Path = SHM_ROOT) -> None:
    """Remove stores left by coordinators that no longer run (a SIGKILLed driver)."""
    with contextlib.suppress(OSError):
        for d in root.glob(f"{PREFIX}*"):
            pid = d.name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
