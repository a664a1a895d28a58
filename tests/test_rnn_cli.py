"""--model rnn through the CLI: config checks, bad sequence data (exit 2, row and step named),
data inspect, evaluate/predict/gradcheck on an RNN model.npz, the report's time heat map."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distbackprop.config import TrainConfig
from distbackprop.errors import ConfigError
from distbackprop.nn import SequenceRNN, load_model
from tests.conftest import run_cli
from tests.seqdata import sequence_column, write_sequences

FAST = ("--local", "--model", "rnn", "--hidden", "6", "--max-steps", "6", "--batch-size", "16",
        "--metrics-port", "0", "--quiet")


def test_config_rnn_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        TrainConfig(model="rnn", hidden=(8, 8), bptt_truncate=0,
                    sequence_target="all").validate()
    text = "\n".join(e.value.problems)
    assert "hidden: --model rnn takes one state size" in text
    assert "bptt_truncate: must be > 0" in text
    assert "sequence_target: 'all' is not one of last, every" in text
    with pytest.raises(ConfigError, match="bptt_truncate: only meaningful with --model rnn"):
        TrainConfig(bptt_truncate=5).validate()
    with pytest.raises(ConfigError, match="model: 'lstm' is not one of mlp, rnn"):
        TrainConfig(model="lstm").validate()


def _bad(tmp_path, rows, target=None) -> str:
    n = len(rows)
    t = pa.table({"x": pa.array(rows), "target": target if target is not None else
                  pa.array(np.arange(n) % 2)})
    path = tmp_path / "bad.parquet"
    pq.write_table(t, path)
    return str(path)


def _rows(n=12, T=5, F=2):
    rng = np.random.default_rng(0)
    return [[list(map(float, s)) for s in r] for r in rng.standard_normal((n, T, F))]


def test_ragged_row_exits_2_naming_row_and_length(tmp_path):
    rows = _rows()
    rows[7] = rows[7][:3]
    r = run_cli("train", "--data", _bad(tmp_path, rows), *FAST, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "sequence column 'x': row 7 of" in r.stderr and "has 3 steps" in r.stderr
    assert "row 0 has 5 steps" in r.stderr


def test_ragged_step_exits_2_naming_row_step_and_length(tmp_path):
    rows = _rows()
    rows[4][2] = [1.0, 2.0, 3.0]
    r = run_cli("train", "--data", _bad(tmp_path, rows), *FAST, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "row 4 of" in r.stderr and "step 2 has 3 features" in r.stderr


def test_nan_at_a_step_exits_2_naming_row_and_step(tmp_path):
    x = np.random.default_rng(1).standard_normal((12, 5, 2))
    x[9, 3, 1] = np.nan
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"x": sequence_column(x), "target": pa.array(np.arange(12) % 2)}),
                   path)
    r = run_cli("train", "--data", str(path), *FAST, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "row 9 of" in r.stderr and "'x[step 3, feature 1]'" in r.stderr


def test_nan_in_a_per_step_target_names_the_step(tmp_path):
    path = write_sequences(tmp_path / "e.parquet", n=12, T=5, F=2, target="every")
    t = pq.read_table(path)
    y = np.array(t.column("target").to_pylist())
    y[6, 2] = np.nan
    t = t.set_column(1, "target", pa.FixedSizeListArray.from_arrays(pa.array(y.ravel()), 5))
    pq.write_table(t, path)
    r = run_cli("train", "--data", str(path), *FAST, "--sequence-target", "every",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "row 6 of" in r.stderr and "target[step 2]" in r.stderr


def test_wrong_nesting_exits_2(tmp_path):
    deep = [[[[1.0]]]] * 12
    r = run_cli("train", "--data", _bad(tmp_path, deep), *FAST, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "feature column 'x'" in r.stderr and "list<list<float>>" in r.stderr
    # plain features are not a sequence: --model rnn says what it needs
    flat = tmp_path / "flat.parquet"
    pq.write_table(pa.table({"a": [1.0] * 12, "b": [2.0] * 12, "target": [0, 1] * 6}), flat)
    r = run_cli("train", "--data", str(flat), *FAST, "--out", str(tmp_path / "o2"))
    assert r.returncode == 2
    assert "model: --model rnn needs one sequence feature column" in r.stderr


def test_every_needs_a_per_step_target(tmp_path):
    path = write_sequences(tmp_path / "l.parquet", n=20, T=5, F=2, target="last")
    r = run_cli("train", "--data", str(path), *FAST, "--sequence-target", "every",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "sequence_target: every needs a per-step regression target" in r.stderr


def test_inspect_shows_steps_and_features(tmp_path):
    path = write_sequences(tmp_path / "v.parquet", n=20, T=7, F=3, nested_lists=True)
    r = run_cli("data", "inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["sequence"] == {"steps": 7, "features": 3} and d["n_features"] == 21
    r = run_cli("data", "inspect", str(path))
    assert "sequence: T = 7 steps × F = 3 features per step" in r.stdout


@pytest.mark.parametrize("target", ["last", "every"])
def test_train_evaluate_predict_on_rnn_model(tmp_path, target):
    path = write_sequences(tmp_path / "d.parquet", n=60, T=6, F=2, target=target,
                           nested_lists=target == "last")
    out = tmp_path / "run"
    extra = ("--sequence-target", "every", "--bptt-truncate", "2") if target == "every" else ()
    r = run_cli("train", "--data", str(path), *FAST, *extra, "--out", str(out))
    assert r.returncode == 0, r.stderr
    model = load_model(out / "model.npz")
    assert isinstance(model, SequenceRNN) and model.n_steps == 6 and model.n_in == 2
    assert model.sequence_target == target and model.meta["sequence"] == [6, 2]
    hist = pq.read_table(out / "history.parquet")
    assert [c for c in hist.column_names if c.startswith("time_grad_norm/")] == [
        "time_grad_norm/t1-2", "time_grad_norm/t3-4", "time_grad_norm/t5-5",
        "time_grad_norm/t6-6"]
    r = run_cli("evaluate", "--model", str(out / "model.npz"), "--data", str(path))
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["samples"] == 60 and np.isfinite(ev["loss"])
    if target == "last":
        assert 0 <= ev["accuracy"] <= 1
    r = run_cli("predict", "--model", str(out / "model.npz"), "--data", str(path),
                "--out", str(tmp_path / "p.parquet"))
    assert r.returncode == 0, r.stderr
    pred = pq.read_table(tmp_path / "p.parquet")
    assert pred.num_rows == 60
    assert pred.num_columns == (2 + 2 if target == "last" else 6)
    r = run_cli("report", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "report" / "time_grad_heatmap.png").stat().st_size > 1000


def test_gradcheck_rnn(tmp_path):
    path = write_sequences(tmp_path / "g.parquet", n=20, T=5, F=2, target="every")
    r = run_cli("gradcheck", "--model", "rnn", "--hidden", "4", "--data", str(path),
                "--sequence-target", "every", "--loss", "mse", "--rows", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rnn.W_h" in r.stdout and "gradcheck: OK" in r.stdout


@pytest.mark.parametrize("target", ["last", "every"])
def test_streaming_rnn(tmp_path, target):
    from distbackprop import Trainer
    path = write_sequences(tmp_path / "s.parquet", n=200, T=6, F=2, target=target)
    cfg = TrainConfig(data=str(path), model="rnn", hidden=(5,), sequence_target=target,
                      local=True, streaming=True, max_steps=8, batch_size=16, dtype="float64",
                      metrics_port=0, quiet=True, out=str(tmp_path / "run"))
    res = Trainer(cfg).fit()
    assert res.summary["steps"] == 8 and np.isfinite(res.summary["val_loss"])
    assert np.all(res.history.column("time_grad_norm/t6-6").to_numpy() > 0)
