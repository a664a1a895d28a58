"""Generate ``digits.parquet``, the embedded dataset (run once; not imported at runtime).

The data is scikit-learn's copy of the UCI "Optical Recognition of Handwritten
Digits" test set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0,
https://doi.org/10.24432/C50P49): 1,797 images of 8×8 pixels, each pixel an
integer 0..16, labelled 0..9.

Layout: 64 integer pixel columns ``pixel_0 .. pixel_63`` (row-major, stored
as ``uint8``) and an ``int64`` ``target`` column; zstd-compressed, one
row group. scikit-learn is needed only to regenerate the file::

    python3 -m distbackprop.data.make_digits   # rewrites distbackprop/data/digits.parquet
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).with_name("digits.parquet")


def main(out: Path = OUT) -> Path:
    """Write the digits Parquet file to ``out`` and return its path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.data, dtype=np.uint8)  # (1797, 64), values 0..16
    columns = {f"pixel_{j}": pa.array(images[:, j]) for j in range(images.shape[1])}
    columns["target"] = pa.array(np.asarray(bunch.target, dtype=np.int64))
    table = pa.table(columns)
    table = table.replace_schema_metadata({
        "source": "UCI Optical Recognition of Handwritten Digits (CC BY 4.0), "
                  "via sklearn.datasets.load_digits",
    })
    tmp = out.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd", compression_level=19)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    path = main()
    print(f"wrote {path} ({path.stat().st_size} bytes)")
