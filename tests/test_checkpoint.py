"""Checkpoints: round trip, manifest, keep-last-K, corruption fall-back, SIGKILL while writing,
and pickle refusal (the payload never runs)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from distbackprop.checkpoint import (
    ARRAYS_FILE,
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    META_FILE,
    TMP_PREFIX,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    safe_load_npz,
    save_checkpoint,
    verify_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _arrays(step: int, n: int = 1000) -> dict[str, np.ndarray]:
    """Deterministic arrays of every dtype a training state holds, different per step."""
    rng = np.random.default_rng(step)
    return {
        "params": rng.standard_normal(n).astype(np.float32),
        "opt.m": rng.standard_normal((n // 10, 10)),
        "opt.v": np.asfortranarray(rng.standard_normal((10, n // 10))),
        "order": rng.permutation(n).astype(np.int64),
        "flags": rng.random(7) < 0.5,
        "scalar": np.float64(step * 0.5),
    }


def _meta(step: int) -> dict:
    rng = np.random.default_rng(step)
    rng.standard_normal(3)
    return {
        "epoch": np.int64(step // 10),
        "position": step % 10,
        "rng": rng.bit_generator.state,
        "loss": np.float32(0.25),
        "config": {"hidden": (128, 64), "lr": 1e-3, "out": Path("runs/x")},
    }


def _tmp_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir()
                  if p.name.startswith(TMP_PREFIX))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and (
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


# ------------------------------------------------------------------------------ round trip


def test_round_trip_is_bit_identical(tmp_path):
    arrays = _arrays(7)
    arrays["specials"] = np.array([np.nan, -0.0, np.inf, -np.inf, 5e-324], dtype=np.float64)
    path = save_checkpoint(tmp_path, 7, arrays, _meta(7))
    assert path == tmp_path / "checkpoints" / "step-00000007"
    loaded, meta = load_checkpoint(path)
    assert list(loaded) == list(arrays)
    for name, arr in arrays.items():
        assert _same_bits(loaded[name], np.asarray(arr)), name
        assert loaded[name].flags.writeable
    assert meta["step"] == 7
    assert meta["epoch"] == 0 and meta["position"] == 7 and meta["loss"] == 0.25
    assert meta["config"] == {"hidden": [128, 64], "lr": 1e-3, "out": "runs/x"}
    # The RNG state survives JSON exactly: a generator restored from it continues identically.
    expected = np.random.default_rng(7)
    expected.standard_normal(3)
    restored = np.random.default_rng()
    restored.bit_generator.state = meta["rng"]
    assert np.array_equal(restored.standard_normal(5), expected.standard_normal(5))


def test_names_that_clash_with_np_savez_keywords(tmp_path):
    arrays = {"file": np.arange(3), "allow_pickle": np.ones(2), "a/b": np.zeros(1)}
    loaded, meta = load_checkpoint(save_checkpoint(tmp_path, 0, arrays, {}))
    assert set(loaded) == set(arrays)
    assert all(_same_bits(loaded[k], v) for k, v in arrays.items())
    assert meta == {"step": 0}


def test_files_and_directories_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    """A SIGKILL cannot show durability (the page cache survives it), so check the protocol:
    every file and the temporary directory are fsynced before the rename into place, and the
    parent directory after it."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = save_checkpoint(tmp_path, 5, {"x": np.zeros(3)}, {"epoch": 1})
    root = str(tmp_path / CHECKPOINTS_DIR)
    commit = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    tmp = events[commit][1]
    assert Path(tmp).parent == Path(root) and Path(tmp).name.startswith(TMP_PREFIX)
    before = [e[1] for e in events[:commit] if e[0] == "fsync"]
    for name in (ARRAYS_FILE, META_FILE, MANIFEST_FILE):
        assert f"{tmp}/{name}" in before, name
    assert before[-1] == tmp  # the directory last, after its files
    assert ("fsync", root) in events[commit + 1:]


def test_manifest_lists_sha256_and_size_of_every_file(tmp_path):
    path = save_checkpoint(tmp_path, 3, _arrays(3), _meta(3))
    assert sorted(p.name for p in path.iterdir()) == [ARRAYS_FILE, MANIFEST_FILE, META_FILE]
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["step"] == 3
    assert set(manifest["files"]) == {ARRAYS_FILE, META_FILE}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    # arrays.npz is a plain NumPy archive, readable without this module and without pickle.
    with np.load(path / ARRAYS_FILE, allow_pickle=False) as npz:
        assert _same_bits(npz["params"], _arrays(3)["params"])


def test_keep_last_k_and_no_temporaries(tmp_path):
    for step in range(0, 60, 10):
        save_checkpoint(tmp_path, step, _arrays(step, 100), {}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000030", "step-00000040", "step-00000050"]
    assert _tmp_entries(tmp_path) == []
    save_checkpoint(tmp_path, 60, _arrays(60, 100), {}, keep=None)
    assert len(list_checkpoints(tmp_path)) == 4
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 70, {}, {}, keep=0)


def test_list_sorts_by_step_number_not_name(tmp_path):
    for step in (5, 100_000_000, 20):  # 9 digits once past 8
        save_checkpoint(tmp_path, step, {"x": np.zeros(1)}, {}, keep=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000005", "step-00000020", "step-100000000"]
    assert latest_checkpoint(tmp_path)[2]["step"] == 100_000_000


def test_overwriting_a_step_replaces_it_atomically(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": np.zeros(4)}, {"v": 1})
    save_checkpoint(tmp_path, 1, {"x": np.ones(4)}, {"v": 2})
    arrays, meta = load_checkpoint(tmp_path / "checkpoints" / "step-00000001")
    assert np.array_equal(arrays["x"], np.ones(4)) and meta["v"] == 2
    assert _tmp_entries(tmp_path) == []


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(CheckpointError, match="'bad'.*object"):
        save_checkpoint(tmp_path, 1, {"ok": np.zeros(2), "bad": np.array([{}], dtype=object)},
                        {})
    with pytest.raises(CheckpointError, match=r"meta\['config'\]\['fn'\]"):
        save_checkpoint(tmp_path, 1, {"ok": np.zeros(2)}, {"config": {"fn": print}})
    with pytest.raises(CheckpointError, match="step"):
        save_checkpoint(tmp_path, 1, {"ok": np.zeros(2)}, {"step": 2})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {"ok": np.zeros(2)}, {})
    assert list_checkpoints(tmp_path) == []
    assert not (tmp_path / CHECKPOINTS_DIR).exists()


def test_no_checkpoints_gives_none(tmp_path):
    assert list_checkpoints(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None


# ------------------------------------------------------------------------------ corruption


def _three_checkpoints(run_dir: Path) -> list[Path]:
    return [save_checkpoint(run_dir, s, _arrays(s), _meta(s), keep=5) for s in (10, 20, 30)]


def _assert_falls_back(run_dir: Path, bad: Path, reason: str) -> None:
    with pytest.warns(UserWarning, match=rf"{bad.name}.*{reason}") as record:
        path, arrays, meta = latest_checkpoint(run_dir)
    assert len(record) == 1
    assert path.name == "step-00000020" and meta["step"] == 20
    assert _same_bits(arrays["params"], _arrays(20)["params"])


def test_flipped_byte_is_a_checksum_error_and_falls_back(tmp_path):
    bad = _three_checkpoints(tmp_path)[-1]
    npz = bad / ARRAYS_FILE
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the float payload: NumPy alone would not notice
    npz.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{ARRAYS_FILE}.*sha256"):
        verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match=ARRAYS_FILE):
        load_checkpoint(bad)
    _assert_falls_back(tmp_path, bad, "sha256")


def test_flipped_byte_in_meta_falls_back(tmp_path):
    bad = _three_checkpoints(tmp_path)[-1]
    meta = bad / META_FILE
    meta.write_bytes(meta.read_bytes().replace(b'"position": 0', b'"position": 9'))
    with pytest.raises(CheckpointError, match=rf"{META_FILE}.*sha256"):
        verify_checkpoint(bad)
    _assert_falls_back(tmp_path, bad, "sha256")


def test_truncated_file_is_a_size_error_and_falls_back(tmp_path):
    bad = _three_checkpoints(tmp_path)[-1]
    npz = bad / ARRAYS_FILE
    os.truncate(npz, npz.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{ARRAYS_FILE}.*truncated"):
        verify_checkpoint(bad)
    _assert_falls_back(tmp_path, bad, "truncated")


@pytest.mark.parametrize("victim", [MANIFEST_FILE, ARRAYS_FILE, META_FILE])
def test_missing_file_falls_back(tmp_path, victim):
    bad = _three_checkpoints(tmp_path)[-1]
    (bad / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"{victim}.*missing"):
        verify_checkpoint(bad)
    _assert_falls_back(tmp_path, bad, "missing")


def test_garbage_manifest_is_refused(tmp_path):
    bad = _three_checkpoints(tmp_path)[-1]
    (bad / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{MANIFEST_FILE}.*not valid JSON"):
        verify_checkpoint(bad)
    (bad / MANIFEST_FILE).write_text(json.dumps({
        "format": "distbackprop-checkpoint", "version": 1, "step": 30,
        "files": {ARRAYS_FILE: {"sha256": "0", "size": 1}, META_FILE: {"sha256": "0", "size": 1},
                  "../../escape": {"sha256": "0", "size": 1}}}))
    with pytest.raises(CheckpointError, match="invalid file name"):
        verify_checkpoint(bad)
    _assert_falls_back(tmp_path, bad, "invalid file name")


def test_every_checkpoint_bad_gives_none_with_a_warning_each(tmp_path):
    for path in _three_checkpoints(tmp_path):
        os.truncate(path / ARRAYS_FILE, 10)
    with pytest.warns(UserWarning) as record:
        assert latest_checkpoint(tmp_path) is None
    assert len(record) == 3


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": np.zeros(3)}, {})
    root = tmp_path / CHECKPOINTS_DIR
    stale = root / f"{TMP_PREFIX}step-00000002-999-dead"
    stale.mkdir()
    (stale / ARRAYS_FILE).write_bytes(b"half written")
    (root / f"{TMP_PREFIX}old-step-00000001-beef").mkdir()
    # A stale temporary is never mistaken for a checkpoint.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert latest_checkpoint(tmp_path)[2]["step"] == 1
    save_checkpoint(tmp_path, 2, {"x": np.ones(3)}, {})
    assert _tmp_entries(tmp_path) == []
    assert latest_checkpoint(tmp_path)[2]["step"] == 2


# ------------------------------------------------------------------------------ SIGKILL


_WRITER = textwrap.dedent("""
    import itertools
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from distbackprop.checkpoint import save_checkpoint

    run_dir = sys.argv[1]
    print("ready", flush=True)
    for n in itertools.count():
        step = n - n // 5  # every fifth save rewrites the previous step: the replace path
        rng = np.random.default_rng(step)
        arrays = {"params": rng.standard_normal(250_000),            # 2 MB
                  "opt.m": rng.standard_normal(250_000).astype(np.float32),
                  "order": rng.permutation(100_000)}                 # ~3.8 MB in all
        save_checkpoint(run_dir, step, arrays, {"epoch": step // 7, "tag": step * 3}, keep=3)
        print("committed", step, flush=True)
""")


def _writer_step(n: int) -> int:
    return n - n // 5


def _expected_params(step: int) -> np.ndarray:
    return np.random.default_rng(step).standard_normal(250_000)


def _allowed_newest(acked: list[int]) -> set[int]:
    """Steps the newest checkpoint may have after a kill, given the acknowledged saves."""
    in_flight = _writer_step(len(acked))
    allowed = {in_flight}  # killed after its rename, before it printed
    if acked:
        allowed.add(acked[-1])
        if in_flight == acked[-1]:
            # Killed between moving the old step-N aside and renaming the new one in: step-N
            # is briefly absent and the previous checkpoint is the newest complete one.
            allowed.add(acked[-1] - 1)
    return allowed


@pytest.mark.timeout(120)
def test_sigkill_while_writing_never_leaves_a_bad_checkpoint(tmp_path):
    """20 writers SIGKILLed at seeded-random moments: the newest checkpoint always verifies.

    Trials 0, 4, 8, ... measure the delay from start-up (the kill may precede the first
    commit); the others from the first commit, so at least 15 trials have one by construction.
    """
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    rng = np.random.default_rng(20240601)
    trials = 20
    with_checkpoint = 0
    left_temporaries = 0
    newest: list[int | None] = []
    for trial in range(trials):
        run_dir = tmp_path / f"run{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-u", str(script), str(run_dir), str(REPO_ROOT)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            if trial % 4:
                assert proc.stdout.readline().split() == ["committed", "0"]
            delay = float(rng.uniform(0.0, 0.4))
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
            assert proc.poll() is None, "writer exited on its own"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            out = proc.stdout.read()
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        committed = [int(line.split()[1]) for line in out.splitlines()
                     if line.startswith("committed")]
        if trial % 4:
            committed.insert(0, 0)
        if (run_dir / CHECKPOINTS_DIR).is_dir() and _tmp_entries(run_dir):
            left_temporaries += 1

        with warnings.catch_warnings():
            # A killed writer must never leave a corrupt step-N: no fall-back warning at all.
            warnings.simplefilter("error")
            found = latest_checkpoint(run_dir)
        newest.append(None if found is None else found[2]["step"])
        if found is None:
            assert committed == [], f"trial {trial}: writer committed {committed} yet none found"
        else:
            with_checkpoint += 1
            path, arrays, meta = found
            verify_checkpoint(path)
            step = meta["step"]
            assert step in _allowed_newest(committed), (trial, committed[-3:], step)
            assert path.name == f"step-{step:08d}"
            assert meta == {"step": step, "epoch": step // 7, "tag": step * 3}
            assert _same_bits(arrays["params"], _expected_params(step))
            assert len(list_checkpoints(run_dir)) <= 4  # keep=3, plus one not yet pruned

        # The next save cleans up whatever the killed writer left.
        save_checkpoint(run_dir, 10_000, {"x": np.zeros(1)}, {}, keep=3)
        assert _tmp_entries(run_dir) == []
        assert latest_checkpoint(run_dir)[2]["step"] == 10_000
        assert len(list_checkpoints(run_dir)) <= 3
    print(f"{trials} kills: {with_checkpoint} with a checkpoint, {left_temporaries} left "
          f"temporaries, newest steps {newest}")
    assert with_checkpoint >= 15
    # The kills did land mid-write (the writer spends nearly all its time inside a save).
    assert left_temporaries >= 1


# ------------------------------------------------------------------------------ pickle refusal


class _Payload:
    """Unpickling this creates a marker file: proof that pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_npz(path: Path, marker: Path) -> None:
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(marker)
    np.savez(path, weights=np.zeros(3), evil=evil)  # np.savez pickles object arrays


def test_payload_is_live_when_pickle_is_allowed(tmp_path):
    """Control: the crafted file really does execute code if anyone allows pickle."""
    marker = tmp_path / "control-ran"
    _pickled_npz(tmp_path / "model.npz", marker)
    with np.load(tmp_path / "model.npz", allow_pickle=True) as npz:
        npz["evil"]
    assert marker.exists()


def test_safe_load_npz_refuses_pickled_member_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    _pickled_npz(tmp_path / "model.npz", marker)
    with pytest.raises(CheckpointError, match=r"model\.npz.*'evil'.*pickle"):
        safe_load_npz(tmp_path / "model.npz")
    assert not marker.exists()


def test_safe_load_npz_refuses_a_bare_pickle_and_a_npy(tmp_path):
    marker = tmp_path / "payload-ran"
    (tmp_path / "model.npz").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(CheckpointError, match=r"model\.npz.*refused"):
        safe_load_npz(tmp_path / "model.npz")
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(marker)
    np.save(tmp_path / "obj.npy", evil, allow_pickle=True)
    with pytest.raises(CheckpointError, match=r"obj\.npy.*refused"):
        safe_load_npz(tmp_path / "obj.npy")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match=r"plain\.npy.*not an \.npz"):
        safe_load_npz(tmp_path / "plain.npy")
    assert not marker.exists()


def test_safe_load_npz_refuses_non_array_members_and_missing_files(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.npz", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"m\.npz.*readme\.txt.*not a NumPy array"):
        safe_load_npz(tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match=r"absent\.npz.*not found"):
        safe_load_npz(tmp_path / "absent.npz")
    np.savez(tmp_path / "ok.npz", w=np.arange(3.0))
    assert _same_bits(safe_load_npz(tmp_path / "ok.npz")["w"], np.arange(3.0))


def test_checkpoint_with_pickled_arrays_is_refused_even_with_a_valid_manifest(tmp_path):
    save_checkpoint(tmp_path, 1, _arrays(1), _meta(1))
    bad = save_checkpoint(tmp_path, 2, _arrays(2), _meta(2))
    marker = tmp_path / "payload-ran"
    _pickled_npz(bad / ARRAYS_FILE, marker)
    # Re-sign the manifest, as an attacker who can write the directory could.
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    data = (bad / ARRAYS_FILE).read_bytes()
    manifest["files"][ARRAYS_FILE] = {"sha256": hashlib.sha256(data).hexdigest(),
                                      "size": len(data)}
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    verify_checkpoint(bad)  # checksums alone cannot catch this
    with pytest.raises(CheckpointError, match=r"arrays\.npz.*'evil'.*pickle"):
        load_checkpoint(bad)
    with pytest.warns(UserWarning, match=r"step-00000002.*pickle"):
        path, _, meta = latest_checkpoint(tmp_path)
    assert meta["step"] == 1 and path.name == "step-00000001"
    assert not marker.exists()


# ----------------------------------------------------------------- malformed, re-signed files
# A manifest re-signed after the arrays changed passes the checksums (as a crash between
# writing and signing by some other tool, or a hand-edited run, would); what is wrong must
# still be named, never surface as a zipfile/KeyError/ValueError traceback.


def _resign(ckpt: Path, **manifest_changes) -> None:
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    for name in (ARRAYS_FILE, META_FILE):
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.update(manifest_changes)
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))


def _replace_arrays(ckpt: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(ckpt / ARRAYS_FILE, **arrays)
    _resign(ckpt)


def test_checkpoint_error_is_an_input_error():
    from distbackprop.errors import InputError

    assert issubclass(CheckpointError, InputError)


def test_manifest_records_every_array_dtype_and_shape(tmp_path):
    arrays = _arrays(3)
    path = save_checkpoint(tmp_path, 3, arrays, {})
    listed = json.loads((path / MANIFEST_FILE).read_text())["arrays"]
    assert listed == {k: {"dtype": np.asarray(v).dtype.str, "shape": list(np.shape(v))}
                      for k, v in arrays.items()}


def test_array_missing_from_the_npz_is_named(tmp_path):
    bad = save_checkpoint(tmp_path, 1, _arrays(1), {})
    arrays = _arrays(1)
    del arrays["opt.m"]
    _replace_arrays(bad, arrays)
    with pytest.raises(CheckpointError, match=rf"{ARRAYS_FILE}: lacks array\(s\) 'opt.m'"):
        load_checkpoint(bad)


def test_array_not_in_the_manifest_is_named(tmp_path):
    bad = save_checkpoint(tmp_path, 1, _arrays(1), {})
    _replace_arrays(bad, {**_arrays(1), "intruder": np.zeros(2)})
    with pytest.raises(CheckpointError, match=r"'intruder' that the manifest does not list"):
        load_checkpoint(bad)


def test_wrong_shape_and_dtype_against_the_manifest_are_named(tmp_path):
    bad = save_checkpoint(tmp_path, 1, _arrays(1), {})
    arrays = _arrays(1)
    arrays["params"] = arrays["params"][:10]
    arrays["order"] = arrays["order"].astype(np.int32)
    _replace_arrays(bad, arrays)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert e.value.problems == [
        f"{bad / ARRAYS_FILE}: array 'params' has shape (10,), the manifest says (1000,)",
        f"{bad / ARRAYS_FILE}: array 'order' has dtype int32, the manifest says int64",
    ]


def test_expect_refuses_a_checkpoint_of_another_model_and_falls_back_to_none(tmp_path):
    good = save_checkpoint(tmp_path, 1, _arrays(1), {})
    assert set(load_checkpoint(good, {"params": ((1000,), np.float32)})[0]) == set(_arrays(1))
    with pytest.raises(CheckpointError, match=r"'params' has shape \(1000,\), the model says "
                                              r"\(64,\)"):
        load_checkpoint(good, {"params": ((64,), "float32")})
    with pytest.raises(CheckpointError, match=r"lacks array\(s\) 'opt.s' that the model lists"):
        load_checkpoint(good, {"opt.s": ((3,), np.float64)})
    with pytest.warns(UserWarning, match=r"step-00000001.*'params' has dtype float32"):
        assert latest_checkpoint(tmp_path, {"params": ((1000,), np.float64)}) is None


def test_manifest_without_arrays_entry_still_loads(tmp_path):
    """Checkpoints written before the manifest listed arrays stay loadable."""
    path = save_checkpoint(tmp_path, 1, _arrays(1), {})
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    del manifest["arrays"]
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert _same_bits(load_checkpoint(path)[0]["params"], _arrays(1)["params"])


@pytest.mark.parametrize(("manifest", "reason"), [
    ("[1, 2]", "not a distbackprop-checkpoint manifest"),
    ('{"format": "distbackprop-checkpoint", "version": 9, "files": {}}', "version 9"),
    ("\xff\xfe", "not valid JSON"),
])
def test_manifest_that_is_not_one_is_named(tmp_path, manifest, reason):
    bad = save_checkpoint(tmp_path, 1, _arrays(1), {})
    (bad / MANIFEST_FILE).write_bytes(manifest.encode("latin-1"))
    with pytest.raises(CheckpointError, match=rf"{MANIFEST_FILE}: .*{reason}"):
        load_checkpoint(bad)


@pytest.mark.parametrize("arrays", [[1, 2], {"params": {"dtype": "<f4"}},
                                    {"params": {"dtype": "nonsense", "shape": [3]}},
                                    {"params": {"dtype": "<f4", "shape": [-1]}}])
def test_malformed_arrays_entry_in_the_manifest_is_named(tmp_path, arrays):
    bad = save_checkpoint(tmp_path, 1, _arrays(1), {})
    _resign(bad, arrays=arrays)
    reasons = "malformed 'arrays' entry|'arrays' is not an object|array 'params' has unknown dtype"
    with pytest.raises(CheckpointError, match=rf"{MANIFEST_FILE}: ({reasons})"):
        load_checkpoint(bad)


def test_truncated_npz_with_a_matching_manifest_is_named(tmp_path):
    bad = save_checkpoint(tmp_path, 1, _arrays(1), {})
    os.truncate(bad / ARRAYS_FILE, (bad / ARRAYS_FILE).stat().st_size // 2)
    _resign(bad)
    with pytest.raises(CheckpointError, match=rf"{ARRAYS_FILE}: cannot read as \.npz"):
        load_checkpoint(bad)
    np.savez(tmp_path / "m.npz", w=np.arange(100.0))
    os.truncate(tmp_path / "m.npz", 300)
    with pytest.raises(CheckpointError, match=r"m\.npz: cannot read as \.npz"):
        safe_load_npz(tmp_path / "m.npz")


def test_bad_meta_json_with_a_matching_manifest_is_named(tmp_path):
    bad = save_checkpoint(tmp_path, 1, _arrays(1), {})
    (bad / META_FILE).write_text("{oops")
    _resign(bad)
    with pytest.raises(CheckpointError, match=rf"{META_FILE}: cannot read checkpoint metadata"):
        load_checkpoint(bad)
    (bad / META_FILE).write_text('{"step": 2}')
    _resign(bad)
    with pytest.raises(CheckpointError, match=rf"{META_FILE}: step 2 disagrees"):
        load_checkpoint(bad)


def test_any_damage_to_a_resigned_npz_loads_or_is_a_checkpoint_error(tmp_path):
    """Truncations and flipped bytes everywhere in the archive: never a raw exception."""
    path = save_checkpoint(tmp_path, 1, {"w": np.arange(50.0), "b": np.ones(3, np.int8)}, {})
    original = (path / ARRAYS_FILE).read_bytes()
    rng = np.random.default_rng(0)
    cases = [original[:k] for k in range(0, len(original), 37)]
    for pos in rng.integers(0, len(original), 60):
        data = bytearray(original)
        data[pos] ^= 1 << int(rng.integers(0, 8))
        cases.append(bytes(data))
    refused = 0
    for data in cases:
        (path / ARRAYS_FILE).write_bytes(data)
        _resign(path)
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            assert str(path / ARRAYS_FILE) in str(e)
            refused += 1
    print(f"{refused} of {len(cases)} damaged archives refused")
    assert refused >= len(cases) // 2  # most damage is caught (CRCs, headers, shapes)
