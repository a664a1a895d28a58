"""The command line: learning on the embedded data, every bad input answered with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli

FAST = ("--metrics-port", "0", "--quiet")


@pytest.fixture(scope="module")
def default_local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    r = run_cli("train", "--local", "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    return out


def test_default_local_run_learns_digits(default_local_run):
    s = json.loads((default_local_run / "summary.json").read_text())
    assert s["val_accuracy"] >= 0.95, s
    for name in ("train_loss", "val_loss", "val_accuracy", "steps", "epochs",
                 "samples_per_second", "startup_seconds", "wall_seconds", "workers",
                 "restarts", "skipped_steps"):
        assert name in s, name
    assert s["epochs"] == pytest.approx(10.0) and s["workers"] == 1


def test_run_directory_contents(default_local_run):
    import yaml

    from distbackprop import TrainConfig, load_model
    cfg = yaml.safe_load((default_local_run / "config.yaml").read_text())
    assert TrainConfig.from_dict(cfg).local is True  # re-runnable with --config
    t = pq.read_table(default_local_run / "history.parquet")
    for col in ("step", "epoch", "loss", "grad_global_norm", "grad_norm/dense0",
                "grad_norm/dense1", "update_ratio/dense0", "lr", "skipped", "step_seconds",
                "time/forward", "time/backward", "time/allreduce", "time/update", "time/data"):
        assert col in t.column_names, col
    s = json.loads((default_local_run / "summary.json").read_text())
    assert t.num_rows == s["steps"]
    m = load_model(default_local_run / "model.npz")
    assert m.sizes == [64, 128, 10]
    assert m.meta["task"] == "classification" and len(m.meta["mean"]) == 64


def test_evaluate_and_predict(default_local_run, tmp_path):
    from distbackprop.data import embedded_digits_path
    r = run_cli("evaluate", "--model", str(default_local_run / "model.npz"),
                "--data", str(embedded_digits_path()))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["samples"] == 1797 and out["accuracy"] > 0.95 and out["loss"] > 0
    pred = tmp_path / "pred.parquet"
    r = run_cli("predict", "--model", str(default_local_run / "model.npz"),
                "--data", str(embedded_digits_path()), "--out", str(pred))
    assert r.returncode == 0, r.stderr
    assert pq.read_table(pred).num_rows == 1797


def test_yaml_config_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hidden: [8]\nmax_steps: 5\nbatch_size: 32\nlocal: true\nquiet: true\n"
                   "metrics_port: 0\n")
    r = run_cli("train", "--config", str(cfg), "--batch-size", "16", "--out",
                str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    import yaml
    resolved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert resolved["batch_size"] == 16 and resolved["hidden"] == [8]


def test_synthetic_regression_drives_mse_below_target_variance(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 5))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.1 * rng.standard_normal(2000)
    path = tmp_path / "reg.parquet"
    pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(5)}, "y": y}), path)
    r = run_cli("train", "--local", "--data", str(path), "--target", "y", "--hidden", "64,64",
                "--epochs", "40", "--lr", "3e-3", "--out", str(tmp_path / "o"), *FAST)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["task"] == "regression" and s["loss"] == "mse"
    # the seed's L = ½‖ŷ − y‖², so ½·Var(y) is the loss of predicting the mean
    assert s["val_loss"] < 0.1 * 0.5 * float(np.var(y)), s


def _bad(tmp_path, *args):
    out = tmp_path / "never"
    r = run_cli("train", "--local", "--out", str(out), *FAST, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert not out.exists(), "nothing may be written for bad input"
    return r.stderr


def test_missing_data_file(tmp_path):
    assert "data: file not found: /nope/x.parquet" in _bad(tmp_path, "--data", "/nope/x.parquet")


def test_missing_target_column(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0], "b": [0, 1]}), p)
    err = _bad(tmp_path, "--data", str(p), "--target", "label")
    assert f"data: target column 'label' not found in {p} (columns: a, b)" in err


def test_non_numeric_feature(tmp_path):
    p = tmp_path / "d.csv"
    pacsv.write_csv(pa.table({"a": [1.0, 2.0, 3.0], "name": ["x", "y", "z"],
                              "target": [0, 1, 0]}), p)
    err = _bad(tmp_path, "--data", str(p), "--features", "a,name")
    assert f"data: feature column 'name' in {p} is not numeric (string)" in err


def test_nan_in_feature_names_row(tmp_path):
    p = tmp_path / "d.parquet"
    a = np.arange(20, dtype=float)
    a[13] = np.nan
    pq.write_table(pa.table({"a": a, "b": np.ones(20), "target": np.arange(20) % 2}), p)
    err = _bad(tmp_path, "--data", str(p))
    assert f"1 row(s) with NaN, inf or a missing value in features (first: row 13 of {p}, " \
        "column 'a')" in err


def test_negative_lr_and_unknown_activation_reported_together(tmp_path):
    err = _bad(tmp_path, "--lr", "-0.1", "--activation", "swish", "--batch-size", "0")
    assert "lr: must be > 0" in err
    assert "activation: 'swish'" in err
    assert "batch_size: must be > 0, got 0" in err


def test_unparsable_number_named(tmp_path):
    err = _bad(tmp_path, "--epochs", "ten")
    assert "distbackprop: error: epochs: " in err and "'ten'" in err


def test_unknown_yaml_key(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text("learning_rate: 0.1\n")
    assert f"{c}: unknown key 'learning_rate'" in _bad(tmp_path, "--config", str(c))


def test_gradcheck_command():
    r = run_cli("gradcheck", "--hidden", "6", "--activation", "tanh")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gradcheck: OK" in r.stdout
    assert "dense0.W" in r.stdout


def test_pickled_model_refused_without_running_payload(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    arr = np.empty(1, dtype=object)
    arr[0] = Evil()
    np.savez(tmp_path / "model.npz", params=arr, allow_pickle=True)
    r = run_cli("evaluate", "--model", str(tmp_path / "model.npz"), "--data", "x.parquet")
    assert r.returncode == 2, r.stderr
    assert (f"model: {tmp_path / 'model.npz'}: member 'params' is a pickled object array; "
            "refused") in r.stderr
    assert not marker.exists()


def test_report_command_writes_readable_pngs(default_local_run):
    r = run_cli("report", str(default_local_run))
    assert r.returncode == 0, r.stderr
    paths = [p for p in r.stdout.split() if p.endswith(".png")]
    assert len(paths) >= 4
    for p in paths:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p


def test_report_on_a_non_run_directory(tmp_path):
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert f"report: {tmp_path} has no history.parquet" in r.stderr


def test_data_inspect_command():
    from distbackprop.data import embedded_digits_path
    r = run_cli("data", "inspect", str(embedded_digits_path()), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["rows"] == 1797
    assert info["task"] == "classification" and info["target"] == ["target"]
    assert info["n_features"] == 64 and info["problems"] == []
    assert sorted(info["class_counts"]) == [str(k) for k in range(10)]
    assert sum(info["class_counts"].values()) == 1797
    r = run_cli("data", "inspect", str(embedded_digits_path()))
    assert r.returncode == 0, r.stderr
    assert "rows:     1797\n" in r.stdout and "problems: none" in r.stdout


def test_a_dropped_column_is_a_warning_even_with_quiet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"f0": rng.standard_normal(64), "f1": ["a"] * 64,
                             "target": rng.integers(0, 2, 64)}), path)
    r = run_cli("train", "--local", "--data", str(path), "--max-steps", "2", "--quiet",
                "--metrics-port", "0", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"distbackprop: warning: column 'f1' (string) of {path} is not numeric: left out "
            "of the features") in r.stderr
