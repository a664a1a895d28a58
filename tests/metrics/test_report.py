"""`make_report`: readable PNGs from a real (tiny) run; vanishing/exploding visible at a
glance in the heat map; thresholds from config.yaml; bad input named."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.config import ConfigError
from distbackprop.report import make_report
from tests.metrics.synth import tiny_training_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED = {"loss.png", "grad_norm_heatmap.png", "grad_norms.png", "update_ratios.png",
            "phase_times.png", "memory.png"}
VANISH_RGB = (0x1F, 0x3F, 0xFF)
NONFINITE_RGB = (0xFF, 0x00, 0xFF)


def _pixels(path, rgb) -> int:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    return int(np.count_nonzero(np.all(np.abs(img * 255 - np.array(rgb)) < 3, axis=-1)))


def _check_png(path):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))
    img = mpimg.imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 500, (path, img.shape)
    assert img[..., :3].std() > 0.05, f"{path} looks blank"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    tiny_training_run(base / "sigmoid", activation="sigmoid", depth=14, steps=60)
    tiny_training_run(base / "relu", activation="relu", depth=14, steps=60, lr=0.05)
    with np.errstate(all="ignore"):
        tiny_training_run(base / "explode", activation="relu", depth=12, steps=40, lr=0.01,
                          init_scale=2.0)
    return base


@pytest.fixture(scope="module")
def reports(runs):
    return {name: {p.name: p for p in make_report(runs / name)}
            for name in ("sigmoid", "relu", "explode")}


def test_report_writes_readable_pngs(runs, reports):
    paths = list(reports["sigmoid"].values())
    assert {p.name for p in paths} == EXPECTED
    for p in paths:
        assert p.parent == runs / "sigmoid" / "report"
        _check_png(p)


def test_heatmap_shows_vanishing_and_healthy_at_a_glance(reports):
    sig = _pixels(reports["sigmoid"]["grad_norm_heatmap.png"], VANISH_RGB)
    relu = _pixels(reports["relu"]["grad_norm_heatmap.png"], VANISH_RGB)
    # the colour bar's "under" triangle carries the colour in both; the sigmoid net's
    # first layers fill whole rows of the map with it
    assert relu < 3000, relu
    assert sig > 20_000, sig


def test_heatmap_shows_nonfinite(reports):
    heat = reports["explode"]["grad_norm_heatmap.png"]
    assert _pixels(heat, NONFINITE_RGB) > 20_000


def test_thresholds_come_from_config_yaml(runs, tmp_path):
    import shutil

    run = tmp_path / "relu"
    shutil.copytree(runs / "relu", run)
    (run / "config.yaml").write_text("vanish_threshold: 0.5\nexplode_threshold: 1000.0\n")
    heat = next(p for p in make_report(run) if p.name == "grad_norm_heatmap.png")
    assert _pixels(heat, VANISH_RGB) > 20_000


def test_no_memory_file_no_memory_plot(runs, tmp_path):
    import shutil

    run = tmp_path / "nomem"
    shutil.copytree(runs / "relu", run)
    (run / "memory.parquet").unlink()
    (run / "config.yaml").unlink()            # defaults apply
    names = {p.name for p in make_report(run)}
    assert names == EXPECTED - {"memory.png"}


def test_bad_input_is_named(tmp_path, runs):
    with pytest.raises(ConfigError, match="history.parquet: not found"):
        make_report(tmp_path)
    (tmp_path / "history.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="history.parquet: cannot read"):
        make_report(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"step": [0, 1]}), tmp_path / "history.parquet")
    with pytest.raises(ConfigError, match="missing column 'loss'"):
        make_report(tmp_path)
    pq.write_table(pa.table({"step": [0, 1], "loss": [1.0, 0.5]}), tmp_path / "history.parquet")
    (tmp_path / "config.yaml").write_text("vanish_threshold: [1\n")
    with pytest.raises(ConfigError, match="config.yaml"):
        make_report(tmp_path)
    (tmp_path / "config.yaml").write_text("vanish_threshold: abc\n")
    with pytest.raises(ConfigError, match="vanish_threshold"):
        make_report(tmp_path)
