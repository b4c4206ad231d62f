"""`ModelCard` refuses a stride the tiling cannot use; cards written before the new fields still load."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas import ModelCard, Thresholds
from schemas.model_card import tiling_problem
from trainer.tiling import plan_tiles

OLD_CARD = {  # as an anomap before `Thresholds.warnings` wrote it
    "schema_version": 1,
    "name": "metal",
    "version": "v1",
    "created_at": "2026-01-02T03:04:05Z",
    "patch_size": 32,
    "stride": 16,
    "latent_dim": 16,
    "base_channels": 8,
    "gamma": 0.9,
    "abnormal_patch_source": "mask",
    "smoothing_sigma": 1.0,
    "data_digest": "test",
    "n_train_images": 3,
    "n_abnormal_images": 2,
    "thresholds": {
        "pixel": 0.1,
        "image": 0.2,
        "pixel_quantile": 0.999,
        "image_quantile": 0.99,
        "n_calibration_images": 3,
    },
}


def _card(**changes: object) -> ModelCard:
    return ModelCard.model_validate({**OLD_CARD, **changes})


@pytest.mark.parametrize(("patch", "stride"), [(32, 33), (32, 64), (64, 100)])
def test_a_stride_larger_than_the_patch_is_refused(patch: int, stride: int) -> None:
    with pytest.raises(ValidationError, match=rf"stride must be in \[1, patch_size={patch}\], got {stride}"):
        _card(patch_size=patch, stride=stride)
    with pytest.raises(ValueError, match="1 <= stride <= patch"):  # what serving would have hit on every image
        plan_tiles(128, 128, patch, stride)


@pytest.mark.parametrize(("patch", "stride"), [(32, 16), (32, 32), (32, 1), (64, 32), (128, 128)])
def test_every_stride_the_tiling_takes_is_accepted(patch: int, stride: int) -> None:
    assert tiling_problem(patch, stride) is None
    assert _card(patch_size=patch, stride=stride).stride == stride
    plan_tiles(128, 128, patch, stride)


def test_a_card_written_before_the_new_fields_still_loads() -> None:
    card = ModelCard.model_validate_json(json.dumps(OLD_CARD))
    assert card.thresholds.warnings == ()
    again = ModelCard.model_validate_json(card.model_dump_json())
    assert again == card


def test_threshold_warnings_round_trip() -> None:
    thresholds = Thresholds(
        pixel=0.1, image=0.2, pixel_quantile=0.999, image_quantile=0.99, n_calibration_images=1, warnings=("few",)
    )
    card = _card(thresholds=thresholds.model_dump())
    assert ModelCard.model_validate_json(card.model_dump_json()).thresholds.warnings == ("few",)
