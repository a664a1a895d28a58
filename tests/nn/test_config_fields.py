"""The config fields the engine adds: activations, quantize_bits, label_smoothing."""

from __future__ import annotations

import pytest

from distbackprop.config import ACTIVATIONS, TrainConfig
from distbackprop.errors import ConfigError
from distbackprop.nn.layers import ACTIVATIONS as NN_ACTIVATIONS
from distbackprop.nn.layers import STRAIGHT_THROUGH


def _problems(**kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw).validate()
    return e.value.problems


def test_every_engine_activation_is_configurable() -> None:
    assert sorted(ACTIVATIONS) == sorted([*NN_ACTIVATIONS, *STRAIGHT_THROUGH])


@pytest.mark.parametrize("activation", ["hardtanh", "sign", "round"])
def test_bounded_activations_default_to_xavier(activation: str) -> None:
    cfg = TrainConfig(activation=activation, quantize_bits=4 if activation == "round" else None)
    assert cfg.validate().resolved_init == "xavier"


def test_quantize_bits() -> None:
    assert TrainConfig(activation="round", quantize_bits=1).validate()
    assert TrainConfig(activation="round", quantize_bits=16).validate()
    assert _problems(activation="round") == [
        "quantize_bits: required with activation 'round' (K in 1..16)"]
    assert _problems(activation="sign", quantize_bits=2) == [
        "quantize_bits: only meaningful with activation 'round', not 'sign'"]
    for k in (0, 17, -3):
        assert _problems(activation="round", quantize_bits=k) == [
            f"quantize_bits: must be an integer in 1..16, got {k}"]
    with pytest.raises(ConfigError, match="quantize_bits"):
        TrainConfig.from_dict({"activation": "round", "quantize_bits": 2.5})
    assert TrainConfig.from_dict({"activation": "round", "quantize_bits": "3"}).quantize_bits == 3


def test_label_smoothing() -> None:
    assert TrainConfig(label_smoothing=0.1).validate()  # loss chosen by the task later
    assert TrainConfig(label_smoothing=0.1, loss="cross_entropy").validate()
    assert TrainConfig(label_smoothing=0.0, loss="mse").validate()
    assert _problems(label_smoothing=0.1, loss="mse") == [
        "label_smoothing: only meaningful with loss 'cross_entropy', not 'mse'"]
    for eps in (1.0, -0.1, float("nan")):
        assert _problems(label_smoothing=eps)[0].startswith("label_smoothing: must be in [0, 1)")
    assert TrainConfig.from_dict({"label_smoothing": "0.2"}).label_smoothing == 0.2


def test_all_problems_reported_together() -> None:
    p = _problems(activation="round", label_smoothing=2.0, lr=-1.0)
    assert {q.split(":")[0] for q in p} == {"quantize_bits", "label_smoothing", "lr"}
