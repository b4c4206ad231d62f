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
        ({"refine_steps": -1}, "refine_steps"),
        ({"search_steps": -5}, "search_steps"),
        ({"search_lambda": 1.5}, "search_lambda"),
        ({"search_lr": 0.0}, "search_lr"),
        # values the model card refuses, and NaN, which passes every comparison: refused before training
        ({"smoothing_sigma": 40.0}, "smoothing_sigma=40.0: .*model card's bounds"),
        ({"smoothing_sigma": float("nan")}, "smoothing_sigma must be a finite number"),
        ({"base_channels": 2}, "base_channels=2"),
        ({"latent_dim": 2000}, "latent_dim=2000"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"kappa": float("nan")}, "kappa"),
        ({"search_lr": float("inf")}, "search_lr"),
        ({"cpus_per_worker": float("nan")}, "cpus_per_worker"),
        ({"patch_size": 32, "mask_min_overlap": 32 * 32 + 1}, "mask_min_overlap=1025 is more pixels than a 32×32"),
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


def test_wide_is_the_demo_with_twice_the_width_and_takes_overrides() -> None:
    wide, demo = TrainConfig.wide(gamma=0.9), TrainConfig.demo(gamma=0.9)
    assert wide.base_channels == 2 * demo.base_channels == 32
    assert wide.replace(base_channels=demo.base_channels) == demo
    assert TrainConfig.wide(base_channels=64, seed=3).base_channels == 64


def test_search_settings_reach_the_scorer_through_the_card() -> None:
    from schemas import AbnormalPatchSource, ScoreMode
    from trainer.pipeline import PROVISIONAL_THRESHOLDS, build_card
    from trainer.scoring import LatentOptions

    cfg = TrainConfig.tiny(refine_steps=3, search_steps=7, search_lambda=0.2, search_lr=0.01)
    card = build_card(cfg, "m", "v1", AbnormalPatchSource.NONE, PROVISIONAL_THRESHOLDS, "digest", 0, 0)
    refine = LatentOptions.for_card(card)
    assert (refine.mode, refine.steps, refine.lam, refine.lr) == (ScoreMode.ENCODER, 3, 0.2, 0.01)
    assert LatentOptions.for_card(card, score_mode=ScoreMode.SEARCH).steps == 7
