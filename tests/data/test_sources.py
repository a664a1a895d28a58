"""Every supported source gives the same arrays: Parquet file/dir/partitioned, IPC, CSV, URI."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from distbackprop.config import ConfigError
from distbackprop.data import (
    DataError,
    embedded_digits_path,
    load_training_data,
    open_source,
)
from tests.data.conftest import cfg, write


def _by_id(bundle, id_col: int):
    """Rows sorted by the id feature, so files read in any order compare equal."""
    order = np.argsort(bundle.x_train[:, id_col], kind="stable")
    return bundle.x_train[order], bundle.y_train[order]


def test_embedded_digits_file():
    path = embedded_digits_path()
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 1797
    names = pq.read_schema(path).names
    assert names == [f"pixel_{j}" for j in range(64)] + ["target"]
    assert meta.row_group(0).column(0).compression.lower() == "zstd"
    assert path.stat().st_size < 200_000
    t = pq.read_table(path)
    assert pa.types.is_integer(t.schema.field("target").type)
    assert sorted(set(t.column("target").to_pylist())) == list(range(10))


def test_default_is_embedded_digits():
    b = load_training_data(cfg())
    assert b.x_train.shape == (1797, 64)
    assert b.task == "classification" and b.classes == list(range(10)) and b.n_outputs == 10
    assert b.source == str(embedded_digits_path())
    raw = pq.read_table(embedded_digits_path())
    np.testing.assert_array_equal(b.x_train[:, 5], raw.column("pixel_5").to_numpy())
    np.testing.assert_array_equal(b.y_train, raw.column("target").to_numpy())


@pytest.mark.parametrize("suffix", ["parquet", "arrow", "feather", "csv"])
def test_single_file_formats_agree(tmp_path, table, suffix):
    path = write(table, tmp_path / f"d.{suffix}")
    b = load_training_data(cfg(path))
    assert b.feature_names == ["f0", "f1", "f2", "id"]
    expected = np.column_stack([table.column(c).to_numpy() for c in b.feature_names])
    np.testing.assert_allclose(b.x_train, expected, rtol=1e-15)
    np.testing.assert_array_equal(b.y_train, table.column("target").to_numpy())


def test_uri_passes_through_pyarrow_fs(tmp_path, table):
    path = write(table, tmp_path / "d.parquet")
    b = load_training_data(cfg(path.as_uri()))
    assert b.x_train.shape == (40, 4)
    assert b.source == path.as_uri()


def test_parquet_directory_many_files_and_row_groups(tmp_path, table):
    for k in range(3):
        write(table.slice(k * 15, 15), tmp_path / "dir" / f"part-{k}.parquet", row_group_size=4)
    (tmp_path / "dir" / "_SUCCESS").write_text("")
    (tmp_path / "dir" / ".hidden.parquet").write_text("not parquet")
    b = load_training_data(cfg(tmp_path / "dir"))
    x, y = _by_id(b, 3)
    np.testing.assert_array_equal(x[:, 3], np.arange(40))
    np.testing.assert_array_equal(y, table.column("target").to_numpy())


def test_hive_partitioned_dataset(tmp_path, table):
    ds.write_dataset(table, tmp_path / "part", format="parquet", partitioning=["target"],
                     partitioning_flavor="hive")
    src = open_source(tmp_path / "part")
    assert src.partition_columns == ("target",)
    b = load_training_data(cfg(tmp_path / "part"))
    # the partition key is the target here; it is not a default feature otherwise
    assert b.feature_names == ["f0", "f1", "f2", "id"]
    x, y = _by_id(b, 3)
    np.testing.assert_array_equal(y, table.column("target").to_numpy())
    np.testing.assert_allclose(x[:, 0], table.column("f0").to_numpy())


def test_partition_key_is_not_a_default_feature(tmp_path, table):
    t = table.append_column("split", pa.array(np.arange(40) % 2))
    ds.write_dataset(t, tmp_path / "p", format="parquet", partitioning=["split"],
                     partitioning_flavor="hive")
    b = load_training_data(cfg(tmp_path / "p"))
    assert "split" not in b.feature_names
    b2 = load_training_data(cfg(tmp_path / "p", features=("f0", "split")))
    assert b2.feature_names == ["f0", "split"]


def test_arrow_and_csv_directories(tmp_path, table):
    for k in range(2):
        write(table.slice(k * 20, 20), tmp_path / "ipc" / f"p{k}.arrow")
        write(table.slice(k * 20, 20), tmp_path / "csv" / f"p{k}.csv")
    for sub in ("ipc", "csv"):
        b = load_training_data(cfg(tmp_path / sub))
        x, _ = _by_id(b, 3)
        np.testing.assert_array_equal(x[:, 3], np.arange(40))


def test_directory_mixing_formats_is_refused(tmp_path, table):
    write(table, tmp_path / "mix" / "a.parquet")
    write(table, tmp_path / "mix" / "b.csv")
    with pytest.raises(DataError, match=r"mix.*mixes file formats"):
        load_training_data(cfg(tmp_path / "mix"))


def test_data_error_is_a_config_error():
    assert issubclass(DataError, ConfigError)
