"""`bench data` runs and reports each figure beside its reference (no timing asserted)."""

from __future__ import annotations

import pytest

from distbackprop.bench import data


@pytest.mark.slow
def test_bench_data_quick_rows():
    rows = data.run(quick=True)
    assert data.TITLE
    measures = [r["measure"] for r in rows]
    assert any(m.startswith("Batcher") for m in measures)
    assert any(m.startswith("pyarrow iter_batches") for m in measures)
    share = rows[-1]
    assert share["measure"].startswith("data time / reference step")
    assert 0 < share["relative"] and "GFLOP/s" in share["reference"]
