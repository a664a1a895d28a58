"""`load_model` on files that are not what they claim: always `InputError` naming the file and
the fault (never a KeyError or zipfile traceback); `save` is atomic."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from distbackprop.errors import InputError
from distbackprop.nn import MLP, load_model


def _good(tmp_path, **kw):
    path = tmp_path / "model.npz"
    MLP([4, 5, 3], dtype=np.float32, seed=0, **kw).save(path, meta={"task": "classification"})
    return path


def _members(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _header(arch_changes=None, drop=(), header=None) -> np.ndarray:
    arch = {"sizes": [4, 5, 3], "activation": "relu", "init": "he", "dtype": "float32",
            "quantize_bits": None}
    arch.update(arch_changes or {})
    for k in drop:
        arch.pop(k)
    h = header if header is not None else {"format": 1, "architecture": arch, "meta": {}}
    return np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)


def _write(path, **members) -> None:
    with open(path, "wb") as f:
        np.savez(f, **members)


def _expect(path, *fragments: str) -> InputError:
    with pytest.raises(InputError) as e:
        load_model(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    assert e.value.problems == [msg]
    return e.value


def test_good_file_loads(tmp_path) -> None:
    m = load_model(_good(tmp_path))
    assert m.sizes == [4, 5, 3] and m.meta == {"task": "classification"}


def test_missing_file(tmp_path) -> None:
    _expect(tmp_path / "nope.npz", "file not found")
    _expect(tmp_path, "not a regular file")


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n", b"PK\x03\x04garbage",
                                     b"\x80\x04K\x01."])  # the last is a pickle of 1
def test_not_a_zip(tmp_path, content: bytes) -> None:
    p = tmp_path / "model.npz"
    p.write_bytes(content)
    _expect(p, "not an .npz (zip) archive")


def test_a_single_npy_file(tmp_path) -> None:
    p = tmp_path / "model.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    p.write_bytes(buf.getvalue())
    _expect(p, "not an .npz (zip) archive")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_truncated(tmp_path, keep: float) -> None:
    good = _good(tmp_path).read_bytes()
    p = tmp_path / "cut.npz"
    p.write_bytes(good[: int(len(good) * keep)])
    _expect(p)  # "not an .npz (zip) archive" or "truncated or corrupt", both name the file


def test_corrupt_member_bytes(tmp_path) -> None:
    p = _good(tmp_path)
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("params.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[start:start + 16] = b"\xff" * 16  # inside the params payload: the CRC no longer holds
    p.write_bytes(bytes(data))
    _expect(p, "corrupt")


@pytest.mark.parametrize("missing", ["params", "header_json"])
def test_missing_members(tmp_path, missing: str) -> None:
    m = _members(_good(tmp_path))
    del m[missing]
    p = tmp_path / "bad.npz"
    _write(p, **m)
    _expect(p, "missing member", missing)


def test_an_unrelated_npz(tmp_path) -> None:
    p = tmp_path / "bad.npz"
    _write(p, a=np.zeros(3), b=np.ones(2))
    _expect(p, "not a distbackprop model", "header_json", "params")


@pytest.mark.parametrize("header,fragment", [
    (np.frombuffer(b"\xff\xfe{", dtype=np.uint8), "not JSON"),
    (np.frombuffer(b"{not json", dtype=np.uint8), "not JSON"),
    (np.frombuffer(b"[1, 2]", dtype=np.uint8), "no 'architecture'"),
    (np.arange(3, dtype=np.int64), "uint8"),
    (_header(drop=("sizes",)), "no 'sizes'"),
    (_header(drop=("activation", "dtype")), "no 'activation'"),
    (_header({"sizes": [4]}), "sizes"),
    (_header({"sizes": [4, -5, 3]}), "sizes"),
    (_header({"sizes": "4,5,3"}), "sizes"),
    (_header({"dtype": "int8"}), "dtype"),
    (_header({"activation": "swish"}), "activation: 'swish'"),
    (_header({"activation": "round"}), "quantize_bits: required"),
    (_header({"activation": "round", "quantize_bits": 40}), "quantize_bits"),
    (_header({"init": "magic"}), "init"),
    (_header(header={"format": 1, "architecture": {"sizes": [4, 5, 3], "activation": "relu",
                                                   "dtype": "float32"}, "meta": [1]}), "meta"),
])
def test_bad_header(tmp_path, header: np.ndarray, fragment: str) -> None:
    m = _members(_good(tmp_path))
    m["header_json"] = header
    p = tmp_path / "bad.npz"
    _write(p, **m)
    _expect(p, fragment)


def test_params_of_the_wrong_shape(tmp_path) -> None:
    m = _members(_good(tmp_path))
    for bad in (m["params"][:-1], m["params"].reshape(1, -1), np.zeros(0, np.float32)):
        p = tmp_path / "bad.npz"
        _write(p, **{**m, "params": bad})
        _expect(p, "params has shape", "[4, 5, 3]")


def test_params_of_the_wrong_architecture(tmp_path) -> None:
    m = _members(_good(tmp_path))
    m["header_json"] = _header({"sizes": [4, 6, 3]})
    p = tmp_path / "bad.npz"
    _write(p, **m)
    _expect(p, "params has shape (43,)", "needs (51,)")


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.complex64, np.bool_])
def test_params_of_the_wrong_dtype(tmp_path, dtype) -> None:
    m = _members(_good(tmp_path))
    m["params"] = m["params"].astype(dtype)
    p = tmp_path / "bad.npz"
    _write(p, **m)
    _expect(p, f"params are {np.dtype(dtype)}", "float32")


@pytest.mark.parametrize("member", ["params", "header_json", "meta/mean"])
def test_pickled_object_arrays_are_refused_without_running_them(tmp_path, member) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    m = _members(_good(tmp_path))
    arr = np.empty(1, dtype=object)
    arr[0] = Evil()
    m[member] = arr
    p = tmp_path / "bad.npz"
    with open(p, "wb") as f:
        np.savez(f, allow_pickle=True, **m)
    _expect(p, "pickled object array", member)
    assert not marker.exists()


def test_save_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch) -> None:
    path = _good(tmp_path)
    before = path.read_bytes()
    m = MLP([4, 5, 3], dtype=np.float32, seed=1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        m.save(path)
    assert path.read_bytes() == before            # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
    monkeypatch.undo()
    m.save(path)
    np.testing.assert_array_equal(load_model(path).params, m.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
