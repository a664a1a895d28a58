"""The configuration's choice lists are exactly what the engine provides (no stale names)."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop import config
from distbackprop.config import TrainConfig
from distbackprop.nn import losses, model
from distbackprop.nn.layers import ACTIVATIONS, STRAIGHT_THROUGH, make_activation
from distbackprop.optim import OPTIMIZERS, Schedule, UpdateRule


def test_activation_choices_match_the_engine():
    assert set(config.ACTIVATIONS) == set(ACTIVATIONS) | set(STRAIGHT_THROUGH)
    for name in config.ACTIVATIONS:
        kw = {"quantize_bits": 2} if name == "round" else {}
        make_activation(name, "a", np.float64, **kw)


def test_loss_init_optimizer_choices_match_the_engine():
    assert config.LOSSES == losses.LOSSES
    assert config.INITS == model.INITS
    assert config.OPTIMIZERS == OPTIMIZERS
    for name in config.OPTIMIZERS:  # every optimizer builds through the one update rule
        UpdateRule.from_config(TrainConfig(optimizer=name), 4, np.float64, [slice(0, 4)], 10)


@pytest.mark.parametrize("kind", config.SCHEDULES)
def test_every_schedule_choice_exists(kind):
    assert Schedule(kind, 0.1, 10)(0) > 0


def test_an_unknown_choice_is_refused_naming_the_field():
    with pytest.raises(config.ConfigError, match="optimizer: 'lion' is not one of"):
        TrainConfig(optimizer="lion").validate()
