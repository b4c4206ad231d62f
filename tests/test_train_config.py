"""`TrainConfig`: validation with errors that name the problem, and a flat card dict."""

from __future__ import annotations

import pytest

from trainer.config import TrainConfig


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patch_size": 48}, "power of two"),
        ({"patch_size": 256}, "power of two"),
        ({"stride": 65}, "stride"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.01}, "gamma"),
        ({"batch_size": 63}, "divisible by num_workers"),
        ({"lr_g": 0.0}, "lr_g"),
        ({"gan_steps": 0, "encoder_steps": 0}, "gan_steps"),
        ({"beta1": 1.0}, "beta1"),
        ({"num_workers": 0}, "num_workers"),
        ({"discriminator_head": "patchy"}, "discriminator_head"),
        ({"contrast_gain": -1.0}, "contrast_gain"),
    ],
)
def test_invalid_values_are_rejected_by_name(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_card_dict_is_flat_and_round_trips() -> None:
    cfg = TrainConfig.demo(gamma=0.9)
    flat = cfg.to_card_dict()
    assert all(isinstance(v, float | int | str | bool) or v is None for v in flat.values())
    assert TrainConfig.from_dict(flat) == cfg


def test_unknown_fields_are_an_error() -> None:
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"patch": 64})


def test_presets_are_valid_and_tiny_is_small() -> None:
    assert TrainConfig.tiny().patch_size == 32
    assert TrainConfig.tiny().total_steps < 10
    assert TrainConfig.demo().num_workers == 2
    assert TrainConfig().patch_size == 64 and TrainConfig().gamma == 1.0
