"""The data plane's inputs (`DataOptions`) and what it reports (`bundle.warnings` vs notes)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from distbackprop.data import DataError, DataOptions, load_training_data
from distbackprop.data.bundle import split_indices
from distbackprop.data.streaming import holdout_mask
from distbackprop.errors import InputError
from tests.data.conftest import cfg, make_table, write

DATA_DIR = Path(__file__).resolve().parents[2] / "distbackprop" / "data"


# ---------------------------------------------------------------- DataOptions
def test_options_of_reads_attributes_and_keeps_defaults_for_the_rest(tmp_path):
    o = DataOptions.of(SimpleNamespace(data=tmp_path / "d.parquet", features=["a", "b"],
                                       seed=7, unrelated="ignored"))
    assert o.data == str(tmp_path / "d.parquet") and o.features == ("a", "b") and o.seed == 7
    assert o.target == "target" and o.on_bad_rows == "error" and o.dtype == "float32"
    assert DataOptions.of(o) is o
    assert DataOptions.of(cfg(None, seed=3)) == DataOptions(
        val_fraction=0.0, standardize=False, dtype="float64", seed=3)


@pytest.mark.parametrize(("field", "value"), [("dtype", "int8"), ("on_bad_rows", "skip"),
                                              ("features", 5)])
def test_options_refuse_bad_values_naming_the_field(field, value):
    with pytest.raises(DataError) as e:
        DataOptions(**{field: value})
    assert e.value.problems[0].startswith(f"{field}: ")


def test_loading_takes_options_or_any_object_with_their_names(tmp_path):
    path = write(make_table(30), tmp_path / "d.parquet")
    opts = DataOptions(data=str(path), val_fraction=0.0, standardize=False, dtype="float64")
    a = load_training_data(opts)
    b = load_training_data(cfg(path))
    c = load_training_data(SimpleNamespace(data=str(path), val_fraction=0.0, standardize=False,
                                           dtype="float64"))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_train, c.x_train)


def test_data_error_is_an_input_error():
    assert issubclass(DataError, InputError)


def _runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_data_package_does_not_import_the_config_module():
    for f in DATA_DIR.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):  # also function-level and TYPE_CHECKING imports
            mods = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(m == "distbackprop.config" or m.endswith(".config") for m in mods), f
    code = ("import sys, distbackprop.data, distbackprop.data.streaming; "
            "sys.exit('distbackprop.config' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_no_module_level_import_cycle_inside_the_data_package():
    mods = {f"distbackprop.data.{f.stem}": _runtime_imports(f) for f in DATA_DIR.glob("*.py")}
    graph = {m: {d for d in deps if d in mods} for m, deps in mods.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return seen

    cyclic = sorted(m for m in graph if m in reach(m))
    assert cyclic == []
    # each loader imports cleanly first, in a fresh interpreter
    for first in ("distbackprop.data.streaming", "distbackprop.data.bundle",
                  "distbackprop.data.tables"):
        assert subprocess.run([sys.executable, "-c", f"import {first}"],
                              timeout=120).returncode == 0, first


# ------------------------------------------------------------------- warnings
@pytest.mark.parametrize("streaming", [False, True])
def test_string_feature_column_left_out_is_a_warning_naming_it(tmp_path, streaming):
    t = make_table(30)
    words = pa.array([f"w{i % 4}" for i in range(30)])
    t = t.set_column(t.schema.get_field_index("f1"), "f1", words)
    path = write(t, tmp_path / "train.parquet")
    b = load_training_data(cfg(path, streaming=streaming))
    assert b.feature_names == ["f0", "f2", "id"]
    assert len(b.warnings) == 1
    w = b.warnings[0]
    assert "'f1'" in w and str(path) in w and "left out of the features" in w
    assert b.notes == []


def test_partition_keys_left_out_are_a_note_not_a_warning(tmp_path):
    for part in ("a", "b"):
        write(make_table(10, seed=ord(part)), tmp_path / "p" / f"split={part}" / "x.parquet")
    b = load_training_data(cfg(tmp_path / "p"))
    assert "split" not in b.feature_names
    assert b.warnings == []
    assert len(b.notes) == 1 and "'split'" in b.notes[0]


def test_a_class_only_in_validation_rows_is_a_warning_naming_it(tmp_path):
    n, fraction, seed = 40, 0.25, 1
    _, val_idx = split_indices(n, fraction, seed)
    labels = np.zeros(n, dtype=np.int64)
    labels[1::2] = 1
    labels[val_idx[0]] = 9  # the only row of class 9 is held out for validation
    path = write(make_table(n, labels=labels), tmp_path / "d.parquet")
    b = load_training_data(cfg(path, val_fraction=fraction, seed=seed))
    assert b.classes == [0, 1, 9]
    assert len(b.warnings) == 1
    w = b.warnings[0]
    assert "1 class(es)" in w and "'target'" in w and "9" in w and str(path) in w


def test_streaming_a_class_only_in_validation_rows_is_a_warning(tmp_path):
    n, fraction, seed = 40, 0.25, 2
    held = np.flatnonzero(holdout_mask(np.arange(n), seed, fraction))
    labels = np.arange(n, dtype=np.int64) % 2
    labels[held[0]] = 7
    path = write(make_table(n, labels=labels), tmp_path / "d.parquet")
    b = load_training_data(cfg(path, val_fraction=fraction, seed=seed, streaming=True))
    assert b.classes == [0, 1, 7]
    assert len(b.warnings) == 1 and "7" in b.warnings[0] and "'target'" in b.warnings[0]


def test_rows_dropped_from_val_data_are_a_warning_naming_that_file(tmp_path):
    t = make_table(40)
    f0 = t.column("f0").to_numpy().copy()
    f0[35] = np.nan
    t = t.set_column(0, "f0", pa.array(f0))
    train = write(t.slice(0, 30), tmp_path / "train.parquet")
    val = write(t.slice(30), tmp_path / "val.parquet")
    for streaming in (False, True):
        b = load_training_data(cfg(train, val_fraction=None, val_data=str(val),
                                   on_bad_rows="drop", streaming=streaming))
        assert b.warnings == [w for w in b.warnings if str(val) in w]
        assert len(b.warnings) == 1 and b.warnings[0].startswith("dropped 1 row(s) of ")
