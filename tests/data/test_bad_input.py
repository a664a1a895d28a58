"""Bad data is refused before training with a message naming the file, column and row."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distbackprop.data import DataError, inspect, load_training_data, prepare_inference
from tests.data.conftest import cfg, write


def _raises(config_or_call, *patterns: str) -> str:
    """Run and expect a DataError (an InputError: exit 2) matching every pattern; return it."""
    with pytest.raises(DataError) as info:
        if callable(config_or_call):
            config_or_call()
        else:
            load_training_data(config_or_call)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    return msg


def _with(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values))


def test_missing_file(tmp_path):
    _raises(cfg(tmp_path / "nope.parquet"), r"file not found: .*nope\.parquet")


def test_unknown_file_type(tmp_path):
    p = tmp_path / "data.bin"
    p.write_bytes(b"\x00\x01\x02 not a table")
    _raises(cfg(p), r"data\.bin: unknown file type")


def test_missing_target_column(tmp_path, table):
    p = write(table, tmp_path / "d.parquet")
    _raises(cfg(p, target="label"), r"target column 'label' not found in .*d\.parquet",
            r"columns: f0, f1, f2, id, target")


def test_missing_feature_column(tmp_path, table):
    p = write(table, tmp_path / "d.parquet")
    _raises(cfg(p, features=("f0", "f9")), r"feature column 'f9' not found in .*d\.parquet")


def test_non_numeric_feature_named_explicitly(tmp_path, table):
    t = table.append_column("name", pa.array([f"n{i}" for i in range(40)]))
    p = write(t, tmp_path / "d.parquet")
    _raises(cfg(p, features=("f0", "name")), r"feature column 'name' .* is not numeric \(string\)")


def test_numeric_column_with_a_text_cell_names_the_row(tmp_path, table):
    f1 = [str(v) for v in table.column("f1").to_pylist()]
    f1[17] = "abc"
    p = write(_with(table, "f1", f1), tmp_path / "d.csv")
    _raises(cfg(p), r"column 'f1' of .*d\.csv is not numeric: row 17 holds 'abc'")


def test_csv_text_cell_far_down_a_big_file(tmp_path):
    n = 60_000  # over one 1 MB CSV block
    lines = ["a,b,target"] + [f"{i},{i * 0.5},{i % 3}" for i in range(n)]
    lines[n - 5] = "x!,1.0,1"
    p = tmp_path / "big.csv"
    p.write_text("\n".join(lines) + "\n")
    _raises(cfg(p), r"column 'a' of .*big\.csv is not numeric: row 59994 holds 'x!'")


@pytest.mark.parametrize("streaming", [False, True])
def test_text_cell_in_a_later_csv_of_a_directory_names_column_file_and_row(tmp_path, table,
                                                                          streaming):
    """A directory's column types come from its first file; a later file's cell that does
    not fit is named like one in a single file (0-based data row), in training and inspect."""
    f1 = [str(v) for v in table.column("f1").to_pylist()]
    write(_with(table, "f1", f1), tmp_path / "dir" / "a.csv")
    f1[23] = "2.5.3"
    write(_with(table, "f1", f1), tmp_path / "dir" / "b.csv")
    want = (r"column 'f1' of .*dir/b\.csv is not double: row 23 \(line 25\) holds '2\.5\.3'; "
            r"fix the value or leave the column out with --features")
    _raises(cfg(tmp_path / "dir", streaming=streaming), "^data: " + want)
    _raises(lambda: inspect(str(tmp_path / "dir")), want)


def test_variable_length_list_is_refused(tmp_path):
    t = pa.table({"img": pa.array([[1.0, 2.0], [3.0], [4.0, 5.0]]), "target": [0, 1, 0]})
    p = write(t, tmp_path / "v.parquet")
    _raises(cfg(p), r"feature column 'img' in .*v\.parquet is a variable-length list",
            r"fixed-size list")
    assert any("variable-length" in m for m in inspect(str(p))["problems"])


def test_empty_dataset(tmp_path, table):
    p = write(table.slice(0, 0), tmp_path / "empty.parquet")
    _raises(cfg(p), r"empty\.parquet has no rows")
    _raises(cfg(p, streaming=True), r"empty\.parquet has no rows")
    (tmp_path / "nothing").mkdir()
    _raises(cfg(tmp_path / "nothing"), r"nothing holds no data files")


@pytest.mark.parametrize("streaming", [False, True])
def test_nan_in_feature_counts_and_names_first_row(tmp_path, table, streaming):
    f2 = table.column("f2").to_numpy().copy()
    f2[[7, 9, 30]] = [np.nan, np.inf, -np.inf]
    p = write(_with(table, "f2", f2), tmp_path / "d.parquet", row_group_size=8)
    _raises(cfg(p, streaming=streaming), r"3 row\(s\) with NaN, inf or a missing value in "
            r"features \(first: row 7 of .*d\.parquet, column 'f2'\)", r"--on-bad-rows drop")


def test_missing_value_in_csv_and_list_cells(tmp_path, table):
    f0 = table.column("f0").to_pylist()
    f0[4] = None
    _raises(cfg(write(_with(table, "f0", f0), tmp_path / "d.csv")),
            r"1 row\(s\) .* \(first: row 4 of .*d\.csv, column 'f0'\)")
    vals = np.arange(12, dtype=np.float32)
    vals[7] = np.nan
    img = pa.FixedSizeListArray.from_arrays(pa.array(vals), 3)
    p = write(pa.table({"img": img, "target": [0, 1, 0, 1]}), tmp_path / "l.parquet")
    _raises(cfg(p), r"first: row 2 of .*l\.parquet, column 'img\[1\]'")


def test_bad_targets(tmp_path, table):
    y = table.column("f0").to_numpy().copy()
    y[12] = np.inf
    t = _with(table, "target", y)
    _raises(cfg(write(t, tmp_path / "r.parquet")),
            r"1 row\(s\) .* in target 'target' \(first: row 12 of .*r\.parquet\)")
    labels = table.column("target").to_pylist()
    labels[3] = None
    _raises(cfg(write(_with(table, "target", labels), tmp_path / "c.parquet")),
            r"in target 'target' \(first: row 3 of .*c\.parquet\)")
    frac = np.arange(40) / 2
    _raises(cfg(write(_with(table, "target", frac), tmp_path / "f.parquet"),
                task="classification"),
            r"non-integral value 0\.5 at row 1 of .*f\.parquet")


def test_bad_row_in_second_file_names_that_file(tmp_path, table):
    write(table.slice(0, 20), tmp_path / "dir" / "a.parquet")
    f0 = table.column("f0").to_numpy()[20:].copy()
    f0[6] = np.nan
    write(_with(table.slice(20), "f0", f0), tmp_path / "dir" / "b.parquet")
    _raises(cfg(tmp_path / "dir"), r"first: row 6 of .*dir/b\.parquet, column 'f0'")


def test_drop_with_every_row_bad(tmp_path, table):
    p = write(_with(table, "f0", np.full(40, np.nan)), tmp_path / "d.parquet")
    _raises(cfg(p, on_bad_rows="drop"), r"every row of .*d\.parquet")


def _truncate(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_parquet_names_the_file(tmp_path, table):
    p = write(table, tmp_path / "t.parquet")
    _truncate(p)
    _raises(cfg(p), r"cannot read .*t\.parquet")
    for k in range(3):
        write(table, tmp_path / "dir" / f"p{k}.parquet")
    _truncate(tmp_path / "dir" / "p2.parquet")
    _raises(cfg(tmp_path / "dir"), r"cannot read .*dir/p2\.parquet")


def test_corrupt_pages_with_intact_footer_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    t = pa.table({"a": rng.normal(size=5000), "target": rng.integers(0, 2, 5000)})
    p = tmp_path / "c.parquet"
    pq.write_table(t, p, compression="snappy")
    data = bytearray(p.read_bytes())
    data[4:80] = b"\xff" * 76  # garble the first page header; the footer still parses
    p.write_bytes(bytes(data))
    _raises(cfg(p), r"cannot read .*c\.parquet")


def test_column_missing_from_one_file(tmp_path, table):
    write(table, tmp_path / "dir" / "a.parquet")
    write(table.drop_columns(["f1"]), tmp_path / "dir" / "b.parquet")
    _raises(cfg(tmp_path / "dir"), r"dir/b\.parquet: missing column\(s\) 'f1'")


def test_label_never_seen_in_training(tmp_path, table):
    b = load_training_data(cfg(write(table, tmp_path / "train.parquet")))
    labels = table.column("target").to_pylist()
    labels[9] = 7
    p = write(_with(table, "target", labels), tmp_path / "eval.parquet")
    _raises(lambda: prepare_inference(b.model_meta(), str(p), "target"),
            r"label 7 in column 'target' at row 9 of .*eval\.parquet was never seen in training")
    v = write(_with(table, "target", labels).slice(5), tmp_path / "val.parquet")
    _raises(cfg(tmp_path / "train.parquet", val_data=str(v)),
            r"val_data: label 7 .* at row 4 of .*val\.parquet was never seen")


def test_feature_count_differs_from_model(tmp_path):
    img = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(24, dtype=np.float32)), 6)
    b = load_training_data(cfg(write(pa.table({"img": img, "target": [0, 1, 0, 1]}),
                                     tmp_path / "six.parquet")))
    img4 = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(16, dtype=np.float32)), 4)
    p = write(pa.table({"img": img4, "target": [0, 1, 0, 1]}), tmp_path / "four.parquet")
    _raises(lambda: prepare_inference(b.model_meta(), str(p), "target"),
            r"four\.parquet gives 4 features .* but the model expects 6")
    digits = load_training_data(cfg()).model_meta()
    _raises(lambda: prepare_inference(digits, str(p)),
            r"model expects 64 features .*four\.parquet lacks 64 of them: 'pixel_0'")


def test_val_fraction_and_val_data_together(tmp_path, table):
    p = write(table, tmp_path / "d.parquet")
    _raises(cfg(p, val_data=str(p), val_fraction=0.2), r"val_fraction: cannot be combined")


def test_several_problems_reported_at_once(tmp_path, table):
    p = write(table, tmp_path / "d.parquet")
    msg = _raises(cfg(p, target="nope", features=("zz", "f0")), r"'nope' not found",
                  r"'zz' not found")
    assert msg.count("not found") == 2


# ------------------------------------------------ nothing half-written is left behind
def test_failed_prediction_write_leaves_no_file(tmp_path, table, monkeypatch):
    from distbackprop.data import predictions, write_predictions

    class Model:
        dtype = np.float64

        def __init__(self, meta):
            self.meta = meta

        def predict(self, x):
            return np.zeros((len(x), 3))

    src = write(table, tmp_path / "d.parquet")
    model = Model(load_training_data(cfg(src)).model_meta())
    out = tmp_path / "pred" / "p.parquet"

    def half_then_fail(tbl, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predictions.pq, "write_table", half_then_fail)
    _raises(lambda: write_predictions(model, str(src), out),
            r"out: cannot write .*pred/p\.parquet: .*No space left on device")
    assert list(out.parent.iterdir()) == []
    # a bad input file is refused before the output directory is touched
    _raises(lambda: write_predictions(model, str(tmp_path / "nope.parquet"), tmp_path / "o" / "p"),
            r"file not found: .*nope\.parquet")
    assert not (tmp_path / "o").exists()


def test_failed_cache_write_leaves_no_file(tmp_path, monkeypatch):
    from distbackprop.data import cache, write_cache

    b = load_training_data(cfg(None))

    class Broken:
        def __init__(self, *a, **kw):
            raise pa.ArrowIOError("disk went away")

    monkeypatch.setattr(cache.pa.ipc, "new_file", Broken)
    _raises(lambda: write_cache(b, tmp_path / "c"), r"cache: cannot write .*c/train\.arrow: "
            r"disk went away")
    assert list((tmp_path / "c").iterdir()) == []


def test_target_problems_name_the_file(tmp_path, table):
    p = write(table.append_column("t2", pa.array(np.arange(40))), tmp_path / "d.parquet")
    _raises(cfg(p, target=("target", "t2"), task="classification"),
            r"classification takes one target column, got 'target', 't2' in .*d\.parquet")
    _raises(cfg(p, features=("f0", "target")),
            r"column 'target' of .*d\.parquet is both the target and a feature")

