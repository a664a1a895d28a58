"""The engine's features through the command line, local mode: a sign (binarized) network
learns the digits; gradcheck passes with hardtanh and says why sign cannot."""

from __future__ import annotations

import json

from tests.conftest import run_cli

FAST = ("--metrics-port", "0", "--quiet")


def test_sign_network_learns_the_digits(tmp_path) -> None:
    from distbackprop.nn import load_model
    out = tmp_path / "sign"
    r = run_cli("train", "--local", "--activation", "sign", "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["val_accuracy"] >= 0.85, s
    m = load_model(out / "model.npz")
    assert m.activation == "sign" and m.init == "xavier"


def test_gradcheck_passes_with_hardtanh() -> None:
    r = run_cli("gradcheck", "--hidden", "6", "--activation", "hardtanh")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gradcheck: OK" in r.stdout


def test_gradcheck_with_sign_explains_the_straight_through_estimator() -> None:
    r = run_cli("gradcheck", "--hidden", "3", "--rows", "2", "--activation", "sign")
    assert "straight-through estimator" in r.stdout, r.stdout + r.stderr


def test_round_without_quantize_bits_is_refused(tmp_path) -> None:
    r = run_cli("train", "--local", "--activation", "round", "--out", str(tmp_path / "o"), *FAST)
    assert r.returncode == 2
    assert "quantize_bits: required" in r.stderr
    assert not (tmp_path / "o").exists()


def test_round_trains_with_quantize_bits(tmp_path) -> None:
    from distbackprop.nn import load_model
    out = tmp_path / "round"
    r = run_cli("train", "--local", "--activation", "round", "--quantize-bits", "2",
                "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["val_accuracy"] >= 0.85
    assert load_model(out / "model.npz").quantize_bits == 2
