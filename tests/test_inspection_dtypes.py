"""`plan_inspection` scales uint8 and uint16 images to [0, 1] whether or not the card flattens the grain."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SMALL_CONFIG

from schemas import ModelCard
from trainer.pipeline import untrained_model
from trainer.synthetic import synth_image
from workers.inspection import plan_inspection


@pytest.fixture(scope="module")
def card() -> ModelCard:
    """The small test model's card (no flattening: ``detrend_sigma`` 0)."""
    images = [synth_image(seed, 64)[0].astype(np.float32) / 255 for seed in range(2)]
    return untrained_model(SMALL_CONFIG, images, "metal", data_digest="test")[0]


@pytest.mark.parametrize("sigma", [0.0, 8.0], ids=["no-detrend", "detrend"])
def test_integer_images_plan_as_their_unit_float_equivalents(card: ModelCard, sigma: float) -> None:
    card = card.model_copy(update={"train_config": {**card.train_config, "detrend_sigma": sigma}})
    u8 = synth_image(4, 96)[0]
    assert u8.dtype == np.uint8
    u16 = u8.astype(np.uint16) * 257  # the same intensities at 16 bits
    as_float = u8.astype(np.float32) / 255
    expected = plan_inspection(as_float, card, chunk_patches=32, batch_patches=8)
    assert expected.padded.min() >= 0.0 and expected.padded.max() <= 1.0
    for image in (u8, u16, as_float.astype(np.float64)):
        plan = plan_inspection(image, card, chunk_patches=32, batch_patches=8)
        assert plan.padded.dtype == np.float32
        np.testing.assert_allclose(plan.padded, expected.padded, atol=1e-6, err_msg=str(image.dtype))
        assert plan.ranges == expected.ranges and plan.layout == expected.layout


def test_other_integer_images_are_refused_with_their_dtype(card: ModelCard) -> None:
    with pytest.raises(ValueError, match="unsupported image dtype int32"):
        plan_inspection(np.zeros((64, 64), dtype=np.int32), card, chunk_patches=32)
    with pytest.raises(ValueError, match="greyscale"):
        plan_inspection(np.zeros((64, 64, 3), dtype=np.uint8), card, chunk_patches=32)
