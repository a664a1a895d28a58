"""The shared-memory commit store: two alternating slots, and a reader that never returns a
state other than the one its descriptor names."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from distbackprop.runtime.commitstore import (
    PREFIX,
    CommitGone,
    CommitStore,
    SlotWriter,
    remove_stale,
    sees,
)


def _state(v: float, n: int = 1001) -> dict[str, np.ndarray]:
    return {"params": np.full(n, v, np.float32), "opt/m": np.arange(n, dtype=np.float32) * v,
            "opt/t": np.array([int(v)], np.int64), "opt/grid": np.full((3, 5), v)}


@pytest.fixture
def store(tmp_path):
    s = CommitStore(tmp_path)
    yield s
    s.close()


def test_a_commit_reads_back_exactly(store):
    w = SlotWriter(str(store.path))
    want = _state(3.5)
    got = w.write(want).read()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])


def test_slots_alternate_and_a_reused_slot_reads_as_gone(store):
    w = SlotWriter(str(store.path))
    first, second = w.write(_state(1.0)), w.write(_state(2.0))
    assert first.slot != second.slot
    np.testing.assert_array_equal(first.read()["params"], 1.0)  # untouched by the second
    w.write(_state(3.0))  # reuses the first's slot
    with pytest.raises(CommitGone, match="holds"):
        first.read()
    np.testing.assert_array_equal(second.read()["params"], 2.0)


def test_a_torn_write_reads_as_gone(store):
    w = SlotWriter(str(store.path))
    w.write(_state(1.0))
    d = w.write(_state(2.0))
    raw = np.memmap(store.path / f"slot{d.slot}", dtype=np.uint8, mode="r+")
    raw[:8].view(np.int64)[0] = 0  # what a writer that died mid-copy leaves
    raw.flush()
    with pytest.raises(CommitGone):
        d.read()


def test_a_new_group_numbers_its_commits_after_the_old_ones(store):
    old = SlotWriter(str(store.path), store.first_seq())
    stale = old.write(_state(1.0))
    new = SlotWriter(str(store.path), store.first_seq())
    fresh = new.write(_state(2.0))
    assert fresh.seq > stale.seq
    with pytest.raises(CommitGone):  # the new writer remade the slot files
        stale.read()
    np.testing.assert_array_equal(fresh.read()["params"], 2.0)


def test_only_a_process_that_sees_the_directory_uses_it(store, tmp_path):
    assert sees(str(store.path), store.token)
    assert not sees(str(store.path), "another token")
    assert not sees(str(tmp_path / "nowhere"), store.token)


def test_close_removes_the_store_and_stale_stores_are_cleaned(tmp_path):
    s = CommitStore(tmp_path)
    s.close()
    assert not s.path.exists()
    # a store whose coordinator is gone (a PID that has exited) is removed by the next one
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f"{PREFIX}{int(dead.stdout)}-abcd"
    stale.mkdir()
    mine = tmp_path / f"{PREFIX}{os.getpid()}-abcd"
    mine.mkdir()
    remove_stale(tmp_path)
    assert not stale.exists() and mine.exists()


def test_no_room_for_the_slots_is_an_error_before_anything_is_mapped(store, monkeypatch):
    import shutil

    from distbackprop.runtime import commitstore
    w = SlotWriter(str(store.path))
    usage = shutil.disk_usage(store.path)
    monkeypatch.setattr(commitstore.shutil, "disk_usage",
                        lambda p: usage._replace(free=commitstore.MARGIN))
    with pytest.raises(commitstore.NoRoom, match="need"):
        w.write(_state(1.0))
    assert not (store.path / "slot0").exists() and not (store.path / "slot1").exists()


def test_prepared_slots_are_written_in_place(store):
    w = SlotWriter(str(store.path))
    w.prepare(_state(0.0))
    inodes = [os.stat(store.path / f"slot{i}").st_ino for i in range(2)]
    d = w.write(_state(4.0))
    assert [os.stat(store.path / f"slot{i}").st_ino for i in range(2)] == inodes
    np.testing.assert_array_equal(d.read()["opt/grid"], 4.0)


def test_a_split_commit_is_whole_only_once_rank_0_seals_it(store):
    """Every rank of a group on one machine writes its block; rank 0 marks the slot torn
    first and seals it last, so a read in between is `CommitGone`, never a mix."""
    n = 1001
    ranks = [SlotWriter(str(store.path), 7), SlotWriter(str(store.path), 7),
             SlotWriter(str(store.path), 7)]
    ranks[0].prepare(_state(0.0, n))
    for w in ranks[1:]:
        w.attach(_state(0.0, n))
    blocks = [(0, 334), (334, 668), (668, n)]
    for v in (1.0, 2.0):
        want = _state(v, n)
        views = [w.begin(mark=r == 0) for r, w in enumerate(ranks)]
        for r, ((lo, hi), into) in enumerate(zip(blocks, views, strict=True)):
            into["params"][lo:hi] = want["params"][lo:hi]
            into["opt/m"][lo:hi] = want["opt/m"][lo:hi]
            if r == 0:
                into["opt/t"][...] = want["opt/t"]
                into["opt/grid"][...] = want["opt/grid"]
        slot = np.memmap(store.path / f"slot{ranks[0]._seq % 2}", dtype=np.uint8, mode="r")
        assert slot[:8].view(np.int64)[0] == 0  # every block in, still torn: not sealed
        got = ranks[0].finish().read()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_attach_refuses_slots_of_another_shape(store):
    SlotWriter(str(store.path)).prepare(_state(0.0, 1001))
    from distbackprop.runtime.commitstore import NoRoom
    with pytest.raises(NoRoom, match="expected"):
        SlotWriter(str(store.path)).attach(_state(0.0, 2002))
