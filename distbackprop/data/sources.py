"""Opening data through ``pyarrow.dataset``: files, directories, partitioned sets, URIs.

A *source* is what the user names with ``--data``: a Parquet file or directory
(hive-partitioned or flat), an Arrow IPC file (``.arrow``/``.feather``/``.ipc``)
or directory, or a CSV file or directory; local paths or any URI
``pyarrow.fs.FileSystem.from_uri`` understands (``file://``, ``s3://``, ``gs://``,
``hdfs://``). Files are read one fragment at a time so that a read error can name
the file it came from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from distbackprop.data.errors import DataError

FORMATS = {
    ".parquet": "parquet", ".pq": "parquet", ".parq": "parquet",
    ".arrow": "ipc", ".feather": "ipc", ".ipc": "ipc",
    ".csv": "csv", ".csv.gz": "csv", ".csv.bz2": "csv", ".csv.zst": "csv",
}
_MAGIC = {b"PAR1": "parquet", b"ARROW1": "ipc"}


def embedded_digits_path() -> Path:
    """Path of the embedded digits dataset (1,797 rows: ``pixel_0..pixel_63``, ``target``)."""
    return Path(__file__).with_name("digits.parquet")


@dataclass
class Source:
    """An opened data source.

    ``fragments`` are the files in a stable (sorted) order; ``partition_columns``
    are the hive partition keys, which are columns of ``dataset.schema`` too.
    """

    path: str
    format: str
    filesystem: pafs.FileSystem
    dataset: ds.Dataset
    fragments: list[ds.Fragment]
    partition_columns: tuple[str, ...]

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    @property
    def files(self) -> list[str]:
        return [f.path for f in self.fragments]


def _format_of(name: str) -> str | None:
    low = name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if low.endswith(suffix):
            return FORMATS[suffix]
    return None


def _sniff(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            head = f.read(6)
    except (OSError, pa.ArrowException):
        return None
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            return fmt
    return None


def _file_format(fmt: str) -> ds.FileFormat:
    if fmt == "parquet":
        return ds.ParquetFileFormat()
    if fmt == "ipc":
        return ds.IpcFileFormat()
    return ds.CsvFileFormat()


def resolve(path: str | os.PathLike, role: str = "data") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a ``pyarrow.fs`` URI."""
    text = os.fspath(path)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{role}: cannot open {text}: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(text)


def open_source(path: str | os.PathLike, role: str = "data") -> Source:
    """Open ``path`` as a dataset; raise `DataError` naming the path when it cannot be read.

    A directory's files are taken recursively, skipping names that start with
    ``.`` or ``_`` (``_SUCCESS``, ``_metadata``) and files of other formats;
    ``key=value`` directories become partition columns.
    """
    text = os.fspath(path)
    fs, inner = resolve(text, role)
    try:
        info = fs.get_file_info(inner)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{role}: cannot open {text}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{role}: file not found: {text}")

    if info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(inner, recursive=True)
        found: dict[str, list[str]] = {}
        for entry in fs.get_file_info(selector):
            if entry.type != pafs.FileType.File:
                continue
            rel = os.path.relpath(entry.path, inner)
            if any(part.startswith((".", "_")) for part in Path(rel).parts):
                continue
            fmt = _format_of(entry.base_name)
            if fmt is not None:
                found.setdefault(fmt, []).append(entry.path)
        if not found:
            raise DataError(
                f"{role}: directory {text} holds no data files "
                f"(looked for {', '.join(sorted(FORMATS))})")
        if len(found) > 1:
            kinds = ", ".join(f"{len(v)} {k}" for k, v in sorted(found.items()))
            raise DataError(f"{role}: directory {text} mixes file formats ({kinds}); "
                            "keep one format per dataset")
        fmt, files = next(iter(found.items()))
        files.sort()
        kwargs = {"partitioning": "hive", "partition_base_dir": inner}
    else:
        fmt = _format_of(info.base_name) or _sniff(fs, inner)
        if fmt is None:
            raise DataError(
                f"{role}: {text}: unknown file type (expected one of "
                f"{', '.join(sorted(FORMATS))})")
        files, kwargs = [inner], {}

    try:
        dataset = ds.dataset(files, filesystem=fs, format=_file_format(fmt), **kwargs)
    except (pa.ArrowException, OSError) as exc:
        bad = _first_unreadable(fs, files, fmt) or text
        raise DataError(f"{role}: cannot read {bad}: {_short(exc)} "
                        f"(is it a complete {fmt} file?)") from exc
    fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    # the keys each file's directory path sets (``dataset.partitioning.schema`` of a
    # flat directory lists every column)
    keys: list[str] = []
    for frag in fragments:
        for k in ds.get_partition_keys(frag.partition_expression):
            if k not in keys:
                keys.append(k)
    part_cols = tuple(c for c in dataset.schema.names if c in keys)
    return Source(text, fmt, fs, dataset, fragments, part_cols)


def _first_unreadable(fs: pafs.FileSystem, files: list[str], fmt: str) -> str | None:
    """The first of ``files`` whose schema cannot be read (the dataset names only some)."""
    fileformat = _file_format(fmt)
    for f in files:
        try:
            fileformat.inspect(f, filesystem=fs)
        except (pa.ArrowException, OSError):
            return f
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# pyarrow's CSV reader: "In CSV column #1: Row #7: CSV conversion error to double: invalid
# value '2.5.3'" -- the column is 0-based, the row a 1-based line number counting the header.
_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to "
                             r"([^:]+): invalid value '(.*)'", re.DOTALL)


def read_error(fragment: ds.Fragment, exc: BaseException, role: str = "data") -> DataError:
    """The `DataError` for a failed read of ``fragment``: names its file, and for a CSV cell
    that does not fit the column's type (a directory's type comes from its first file) the
    column, the 0-based data row and the value."""
    m = _CSV_CONVERSION.search(str(exc))
    if m:
        index, line, typ, value = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        try:
            column = repr(fragment.physical_schema.names[index])
        except (pa.ArrowException, OSError, IndexError):
            column = f"#{index}"
        return DataError(f"{role}: column {column} of {fragment.path} is not {typ}: row "
                         f"{line - 2} (line {line}) holds {value!r}; fix the value or leave "
                         "the column out with --features")
    return DataError(f"{role}: cannot read {fragment.path}: {_short(exc)}")


def read_fragment(src: Source, fragment: ds.Fragment, columns: list[str],
                  role: str = "data") -> pa.Table:
    """Read ``columns`` of one fragment; a read error becomes a `DataError` naming its file."""
    try:
        return fragment.to_table(schema=src.schema, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise read_error(fragment, exc, role) from exc


def check_fragment_columns(src: Source, fragment: ds.Fragment, columns: list[str],
                           role: str = "data") -> None:
    """Every file must carry every needed column itself (the dataset would fill nulls)."""
    try:
        have = set(fragment.physical_schema.names)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{role}: cannot read {fragment.path}: {_short(exc)}") from exc
    have |= set(src.partition_columns)
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"{role}: {fragment.path}: missing column(s) "
                        f"{', '.join(repr(c) for c in missing)} (present in {src.files[0]})")


def read_table(src: Source, columns: list[str], role: str = "data"
               ) -> tuple[pa.Table, list[tuple[str, int, int]]]:
    """Read ``columns`` from every file; returns the table and spans ``(file, start, rows)``.

    ``spans`` map a row of the concatenated table back to its file, for messages.
    """
    tables, spans, start = [], [], 0
    for frag in src.fragments:
        check_fragment_columns(src, frag, columns, role)
        t = read_fragment(src, frag, columns, role)
        tables.append(t)
        spans.append((frag.path, start, t.num_rows))
        start += t.num_rows
    if not tables:
        return src.schema.empty_table().select(columns), spans
    return pa.concat_tables(tables), spans


def locate(spans: list[tuple[str, int, int]], row: int) -> tuple[str, int]:
    """(file, row within the file) of global row ``row``."""
    for path, start, n in spans:
        if start <= row < start + n:
            return path, row - start
    return (spans[-1][0] if spans else "?"), row
