"""Atomic, pickle-free checkpoints with a sha256 manifest, and keep-last-K.

Layout of one checkpoint (``run_dir/checkpoints/step-<8 digits>/``)::

    arrays.npz     named arrays (parameters, optimizer state), plain .npy members, no pickles
    meta.json      {"step": int, ...whatever the caller passed: epoch, data position, RNG state,
                    config} -- JSON only, so nothing in it can execute on load
    manifest.json  {"format", "version", "step", "files": {name: {"sha256", "size"}},
                    "arrays": {name: {"dtype", "shape"}}}  ("arrays" is absent in older ones)

Commit protocol (crash-safe against a SIGKILL at any instant; the fsyncs extend it to power
loss on filesystems that honour them): write every file into ``checkpoints/.tmp-*``, fsync each
file, fsync the temporary directory, ``os.rename`` it to ``step-<N>``, fsync ``checkpoints/``.
A ``step-<N>`` name therefore only ever refers to a complete checkpoint; anything a killed writer
left behind is named ``.tmp-*`` and is removed by the next save. Writers serialise on an
``fcntl.flock`` of ``checkpoints/.lock`` (released by the kernel if the holder dies), so removing
``.tmp-*`` never races a live writer.

Loading verifies the manifest (size, then sha256 of every listed file) and reads arrays with
``np.load(allow_pickle=False)``: an object array is refused before any byte of it is unpickled.
The arrays read must be exactly those the manifest lists, with its dtypes and shapes (and, when
the caller says what it expects, those). Every failure is a `CheckpointError` (an `InputError`:
CLI exit status 2) naming the file, and the member where there is one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .atomic import fsync_dir
from .errors import InputError

__all__ = [
    "ARRAYS_FILE",
    "CHECKPOINTS_DIR",
    "ArraySpec",
    "CheckpointError",
    "MANIFEST_FILE",
    "META_FILE",
    "TMP_PREFIX",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "safe_load_npz",
    "save_checkpoint",
    "verify_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"
ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
FORMAT = "distbackprop-checkpoint"
VERSION = 1

_STEP_DIR = re.compile(r"step-(\d{8,})")
_HASH_CHUNK = 1 << 20


class CheckpointError(InputError):
    """A checkpoint or array file is missing, corrupt, or carries something other than plain
    arrays; the message names the file (an `InputError`: CLI exit status 2)."""


# --------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    keep: int | None = 3,
) -> Path:
    """Atomically write checkpoint ``run_dir/checkpoints/step-<8 digits>/`` and return its path.

    ``arrays``: name → array of any numeric/bool/string dtype and shape (object dtypes are
    refused: they would need pickle). ``meta``: JSON-serialisable mapping (NumPy scalars and
    arrays, tuples and paths are converted); it is stored with ``"step": step`` added.
    After the commit only the newest ``keep`` checkpoints remain (``None``: keep all).
    Re-saving an existing step replaces it atomically. Raises ``CheckpointError`` for input that
    cannot be stored, before anything is written.
    """
    step = _check_step(step)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
    # Validate and serialise everything before touching the disk: bad input writes nothing.
    plain = _plain_arrays(arrays)
    meta_bytes = _meta_json(meta, step)

    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / _step_name(step)
    with _writer_lock(ckpt_root):
        _remove_stale_tmp(ckpt_root)
        tmp = ckpt_root / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            _write_npz(tmp / ARRAYS_FILE, plain)
            _write_bytes(tmp / META_FILE, meta_bytes)
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "files": {
                    name: {"sha256": _sha256(tmp / name), "size": (tmp / name).stat().st_size}
                    for name in (ARRAYS_FILE, META_FILE)
                },
                "arrays": {
                    name: {"dtype": arr.dtype.str, "shape": list(arr.shape)}
                    for name, arr in plain.items()
                },
            }
            _write_bytes(tmp / MANIFEST_FILE, _dumps(manifest))
            fsync_dir(tmp)
            replaced = None
            if final.exists():
                # rename(2) cannot replace a non-empty directory: move the old one aside under a
                # .tmp- name first, so a kill in between leaves only removable debris.
                replaced = ckpt_root / f"{TMP_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
                os.rename(final, replaced)
            try:
                os.rename(tmp, final)
            except BaseException:
                if replaced is not None:
                    os.rename(replaced, final)
                raise
            fsync_dir(ckpt_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        if keep is not None:
            _prune(ckpt_root, keep)
    return final


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _plain_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise CheckpointError(f"arrays must be a mapping of name → array, got {type(arrays)}")
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise CheckpointError(f"array name {name!r}: must be a non-empty string")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise CheckpointError(
                f"array {name!r}: dtype {arr.dtype} holds Python objects, which would need "
                "pickle; checkpoints store plain numeric arrays only"
            )
        out[name] = arr
    return out


def _jsonable(value: Any, where: str) -> Any:
    """`value` converted to plain JSON types; CheckpointError naming `where` otherwise."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject or value.dtype.kind not in "biuf":
            raise CheckpointError(f"meta{where}: array of dtype {value.dtype} is not JSON data")
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"meta{where}: key {k!r} is not a string")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CheckpointError(
        f"meta{where}: {type(value).__name__} is not JSON data (store state as numbers, "
        "strings, lists and dicts)"
    )


def _meta_json(meta: Mapping[str, Any], step: int) -> bytes:
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"meta must be a mapping, got {type(meta).__name__}")
    plain = _jsonable(meta, "")
    if "step" in plain and plain["step"] != step:
        raise CheckpointError(f"meta['step'] = {plain['step']!r} disagrees with step = {step}")
    return _dumps({"step": step, **plain})


def _dumps(obj: Any) -> bytes:
    # NaN/inf are allowed (a diverged loss may be recorded); Python's json reads them back.
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # The .npz layout np.savez writes (stored .npy members, zip64), but with
    # allow_pickle=False and no keyword clash on names such as "file".
    with open(path, "wb") as f:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    # Not `atomic_write_bytes`: this file lives in the checkpoint's private temporary directory,
    # whose rename is the atomic step, so a second rename per file would add nothing.
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _writer_lock(ckpt_root: Path) -> Iterator[None]:
    fd = os.open(ckpt_root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _remove_stale_tmp(ckpt_root: Path) -> None:
    """Remove what a killed writer left (``.tmp-*``); call only under the writer lock."""
    for entry in ckpt_root.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    fsync_dir(ckpt_root)


def _prune(ckpt_root: Path, keep: int) -> None:
    old = list_checkpoints(ckpt_root.parent)[:-keep]
    for path in old:
        # Rename out of the step-N namespace first: a kill during rmtree must not leave a
        # half-deleted directory that still looks like a checkpoint.
        doomed = ckpt_root / f"{TMP_PREFIX}del-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
    if old:
        fsync_dir(ckpt_root)
    for entry in ckpt_root.iterdir():
        if entry.name.startswith(f"{TMP_PREFIX}del-"):
            shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Listing, verifying, loading


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Committed checkpoint directories of ``run_dir``, oldest step first.

    Only a committed checkpoint carries a ``step-<N>`` name (writers build under ``.tmp-*`` and
    rename), so each entry is complete as written; corruption since then is what
    ``verify_checkpoint`` detects. An unreadable ``checkpoints/`` is a ``CheckpointError``.
    """
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_root.is_dir():
        return []
    found = []
    try:
        for entry in ckpt_root.iterdir():
            m = _STEP_DIR.fullmatch(entry.name)
            if m and entry.is_dir():
                found.append((int(m.group(1)), entry))
    except OSError as e:
        raise CheckpointError(f"{ckpt_root}: cannot list checkpoints ({e})") from None
    return [path for _, path in sorted(found)]


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST_FILE
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: manifest is missing") from None
    except OSError as e:
        raise CheckpointError(f"{mpath}: cannot read manifest ({e})") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: manifest is not valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(files, dict)
    ):
        raise CheckpointError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{mpath}: manifest version {manifest.get('version')!r} is not supported "
            f"(expected {VERSION})"
        )
    for name in (ARRAYS_FILE, META_FILE):
        if name not in files:
            raise CheckpointError(f"{mpath}: manifest does not list {name}")
    for name, entry in files.items():
        # Names come from a file on disk: never let one point outside the checkpoint.
        if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
            raise CheckpointError(f"{mpath}: invalid file name {name!r} in manifest")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
        ):
            raise CheckpointError(f"{mpath}: malformed manifest entry for {name}")
    arrays = manifest.get("arrays")
    if arrays is not None:
        if not isinstance(arrays, dict):
            raise CheckpointError(f"{mpath}: 'arrays' is not an object")
        for name, entry in arrays.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("dtype"), str)
                or not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                           for d in shape)
            ):
                raise CheckpointError(f"{mpath}: malformed 'arrays' entry for {name!r}")
            try:
                np.dtype(entry["dtype"])
            except TypeError:
                raise CheckpointError(
                    f"{mpath}: array {name!r} has unknown dtype {entry['dtype']!r}"
                ) from None
    m = _STEP_DIR.fullmatch(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        raise CheckpointError(
            f"{mpath}: manifest step {manifest.get('step')!r} does not match directory "
            f"{path.name}"
        )
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check every file the manifest lists: present, same size, same sha256.

    Raises ``CheckpointError`` naming the first missing or mismatching file (or the manifest).
    """
    _verified_manifest(Path(path))


def _verified_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    manifest = _read_manifest(path)
    for name, entry in manifest["files"].items():
        fpath = path / name
        try:
            size = fpath.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{fpath}: listed in the manifest but missing") from None
        except OSError as e:
            raise CheckpointError(f"{fpath}: cannot read ({e})") from None
        if size != entry["size"]:
            raise CheckpointError(
                f"{fpath}: size {size} bytes, manifest says {entry['size']} (truncated or "
                "modified)"
            )
        try:
            digest = _sha256(fpath)
        except OSError as e:
            raise CheckpointError(f"{fpath}: cannot read ({e})") from None
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{fpath}: sha256 {digest[:16]}… does not match the manifest's "
                f"{entry['sha256'][:16]}… (corrupted)"
            )
    return manifest


ArraySpec = tuple[Sequence[int], DTypeLike]
"""What a caller expects of one array: ``(shape, dtype)``."""


def load_checkpoint(
    path: str | os.PathLike[str],
    expect: Mapping[str, ArraySpec] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of checkpoint directory ``path``, after verifying its manifest.

    Arrays are fresh writable NumPy arrays read with ``allow_pickle=False``; they must be the
    ones the manifest lists, with its dtypes and shapes. ``expect`` (name → ``(shape, dtype)``)
    additionally requires each named array to be present with that shape and dtype (e.g. the
    model being resumed), so a checkpoint of another model is refused here rather than failing
    later. ``meta`` is the JSON dict written by ``save_checkpoint`` (including ``"step"``).
    Raises ``CheckpointError`` naming the file and, where there is one, the array.
    """
    path = Path(path)
    manifest = _verified_manifest(path)
    apath = path / ARRAYS_FILE
    arrays = safe_load_npz(apath)
    if "arrays" in manifest:
        _check_arrays(apath, arrays, manifest["arrays"], "the manifest", exact=True)
    if expect is not None:
        spec = {name: {"shape": list(shape), "dtype": np.dtype(dtype).str}
                for name, (shape, dtype) in expect.items()}
        _check_arrays(apath, arrays, spec, "the model", exact=False)
    mpath = path / META_FILE
    try:
        meta = json.loads(mpath.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: cannot read checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{mpath}: metadata is not an object with an integer 'step'")
    if meta["step"] != manifest.get("step"):
        raise CheckpointError(
            f"{mpath}: step {meta['step']} disagrees with the manifest's {manifest.get('step')!r}"
        )
    return arrays, meta


def _check_arrays(
    apath: Path,
    arrays: Mapping[str, np.ndarray],
    spec: Mapping[str, Mapping[str, Any]],
    against: str,
    exact: bool,
) -> None:
    """Every array in ``spec`` is present with its shape and dtype; with ``exact`` no others."""
    problems = []
    missing = [name for name in spec if name not in arrays]
    if missing:
        problems.append(f"lacks array(s) {', '.join(map(repr, missing))} that {against} lists")
    if exact:
        extra = [name for name in arrays if name not in spec]
        if extra:
            problems.append(f"holds array(s) {', '.join(map(repr, extra))} that {against} "
                            "does not list")
    for name, want in spec.items():
        if name not in arrays:
            continue
        arr = arrays[name]
        shape, dtype = tuple(want["shape"]), np.dtype(want["dtype"])
        if arr.shape != shape:
            problems.append(f"array {name!r} has shape {arr.shape}, {against} says {shape}")
        if arr.dtype != dtype:
            problems.append(f"array {name!r} has dtype {arr.dtype}, {against} says {dtype}")
    if problems:
        raise CheckpointError([f"{apath}: {p}" for p in problems])


def latest_checkpoint(
    run_dir: str | os.PathLike[str],
    expect: Mapping[str, ArraySpec] | None = None,
) -> tuple[Path, dict[str, np.ndarray], dict[str, Any]] | None:
    """Newest checkpoint of ``run_dir`` that verifies and loads: ``(path, arrays, meta)``.

    A newer checkpoint that fails is skipped with a ``UserWarning`` naming it and the reason
    (the fall-back to the previous good one). ``None`` when no checkpoint is usable.
    ``expect``: as for `load_checkpoint`.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            arrays, meta = load_checkpoint(path, expect)
        except CheckpointError as e:
            warnings.warn(
                f"skipping checkpoint {path}: {e}; falling back to the previous one",
                UserWarning,
                stacklevel=2,
            )
            continue
        return path, arrays, meta
    return None


def safe_load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All arrays of ``.npz`` file ``path`` as ``{name: ndarray}``, never unpickling anything.

    Uses ``np.load(allow_pickle=False)``: NumPy refuses an object array from its header, before
    reading the pickled bytes. Anything that is not a zip of plain ``.npy`` members (a bare
    pickle, a ``.npy`` file, a non-array member, a corrupt archive) raises ``CheckpointError``
    naming the file and, where known, the member.
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except ValueError as e:
        # np.load says "pickled data" both for a bare pickle and for anything unrecognised.
        raise CheckpointError(
            f"{path}: not a NumPy .npz archive, or it needs pickle to load ({e}); refused"
        ) from None
    except Exception as e:  # a corrupt archive surfaces as zipfile/OS/EOF/struct errors
        raise CheckpointError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: a single .npy array, not an .npz archive; refused")
    out: dict[str, np.ndarray] = {}
    with loaded:
        for name in loaded.files:
            try:
                value = loaded[name]
            except ValueError as e:
                if "pickle" in str(e):
                    raise CheckpointError(
                        f"{path}: member {name!r} holds Python objects that need pickle to "
                        f"load ({e}); refused"
                    ) from None
                raise CheckpointError(f"{path}: member {name!r} is corrupt ({e})") from None
            except Exception as e:  # corrupt member: BadZipFile (CRC), EOFError, OSError, ...
                raise CheckpointError(
                    f"{path}: member {name!r} is corrupt ({type(e).__name__}: {e})"
                ) from None
            if not isinstance(value, np.ndarray):
                raise CheckpointError(f"{path}: member {name!r} is not a NumPy array; refused")
            out[name] = value
    return out
