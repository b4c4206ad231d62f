"""Input flattening along the grain (`trainer.detrend`): the math, its errors, and that every path applies it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import SMALL_CONFIG
from scipy.ndimage import gaussian_filter

from trainer.config import TrainConfig
from trainer.detrend import FLAT_LEVEL, Detrend, DetrendAxis, detrend
from trainer.gan import PatchSampler
from trainer.patches import abnormal_patch_bank
from trainer.pipeline import untrained_model
from trainer.scoring import PatchModel, anomaly_map
from trainer.synthetic import DefectKind, synth_image
from workers.inspection import LocalInspector, inspect_in_ranges


def _streaked(height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """Rows of different brightness (streaks along x), each drifting slowly along x: (H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0.3, 0.7, size=(height, 1))
    drift = 0.05 * np.sin(np.linspace(0, np.pi, width))[None, :]
    return (rows + drift).astype(np.float32)


def test_flattening_along_x_removes_streaks_and_keeps_what_crosses_them() -> None:
    image = _streaked()
    image[:, 40] -= 0.1  # a groove across the grain (a vertical line)
    flat = detrend(image, sigma=6.0, axis=DetrendAxis.X)
    assert flat.dtype == np.float32 and flat.shape == image.shape
    interior = np.delete(flat[:, 20:76], 40 - 20, axis=1)
    assert np.abs(interior - FLAT_LEVEL).max() < 0.02  # the streaks are gone (the raw rows span 0.3-0.7)
    assert (flat[:, 40] < FLAT_LEVEL - 0.08).all()  # the groove stays


def test_a_flat_image_becomes_the_flat_level_and_sigma_zero_is_the_identity() -> None:
    np.testing.assert_allclose(detrend(np.full((20, 30), 0.8, np.float32), 5.0), FLAT_LEVEL, atol=1e-6)
    image = _streaked()
    same = detrend(image, 0.0)
    np.testing.assert_array_equal(same, image)
    assert same is not image


def test_8_and_16_bit_images_are_scaled_to_unit_range_first() -> None:
    image = _streaked()
    expected = detrend(image, 6.0)
    np.testing.assert_allclose(detrend(np.round(image * 255).astype(np.uint8), 6.0), expected, atol=3e-3)
    np.testing.assert_allclose(detrend(np.round(image * 65535).astype(np.uint16), 6.0), expected, atol=1e-4)


def test_the_axes_are_transposes_and_xy_is_an_isotropic_blur() -> None:
    image = _streaked(48, 48)
    np.testing.assert_allclose(detrend(image, 4.0, "y"), detrend(image.T, 4.0, "x").T, atol=1e-6)
    expected = image - gaussian_filter(image, 4.0, mode="reflect") + FLAT_LEVEL
    np.testing.assert_allclose(detrend(image, 4.0, "xy"), expected, atol=1e-6)


def test_flattening_along_x_treats_every_row_on_its_own() -> None:
    image = _streaked()
    np.testing.assert_array_equal(detrend(image, 8.0, "x")[10:30], detrend(image[10:30], 8.0, "x"))


@pytest.mark.parametrize(
    ("sigma", "axis", "message"),
    [
        (-1.0, "x", "detrend sigma must be a finite number >= 0"),
        (math.nan, "x", "detrend sigma must be a finite number >= 0"),
        (math.inf, "x", "detrend sigma must be a finite number >= 0"),
        (4.0, "z", "detrend axis must be one of"),
    ],
)
def test_bad_settings_are_named(sigma: float, axis: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detrend(_streaked(), sigma, axis)
    with pytest.raises(ValueError, match=message):
        Detrend(sigma, axis)  # type: ignore[arg-type]


def test_a_colour_image_is_refused() -> None:
    with pytest.raises(ValueError, match=r"greyscale \(H, W\)"):
        detrend(np.zeros((8, 8, 3), np.float32), 2.0)


def test_train_config_validates_and_carries_it_into_the_card_dict() -> None:
    cfg = TrainConfig.demo()
    assert cfg.detrend == Detrend(12.0, DetrendAxis.X)
    assert Detrend.of(cfg.to_card_dict()) == cfg.detrend
    assert not Detrend.of({}).active  # versions trained before it existed
    with pytest.raises(ValueError, match="detrend_sigma must be a finite number >= 0"):
        TrainConfig.demo(detrend_sigma=-2.0)
    with pytest.raises(ValueError, match="detrend_axis must be one of"):
        TrainConfig.demo(detrend_axis="diagonal")


def test_an_inactive_detrend_hands_images_back_untouched() -> None:
    images = [np.zeros((4, 4), np.uint8)]
    assert Detrend().images(images) is images
    assert Detrend()(images[0]) is images[0]


def test_training_sees_flattened_normal_and_abnormal_patches() -> None:
    cfg = SMALL_CONFIG.replace(detrend_sigma=6.0)
    image = (_streaked() * 255).astype(np.uint8)
    sampler = PatchSampler([image], None, cfg)
    np.testing.assert_allclose(sampler.normal_images[0], cfg.detrend(image.astype(np.float32) / 255), atol=1e-6)
    mask = np.zeros(image.shape, bool)
    mask[10:20, 10:20] = True
    bank, _ = abnormal_patch_bank([image], [mask], 32, 16, detrend=cfg.detrend)
    raw, _ = abnormal_patch_bank([image], [mask], 32, 16)
    assert bank.shape == raw.shape
    assert float(bank.std()) < 0.02 < float(raw.std())  # the streaks (rows 0.3-0.7) are gone from the bank


def test_every_scoring_path_flattens_as_the_version_was_trained() -> None:
    calibration = [synth_image(seed, 96)[0] for seed in range(2)]
    card, state = untrained_model(SMALL_CONFIG.replace(detrend_sigma=8.0), calibration, "metal")
    model = PatchModel.from_state(card, state, device="cpu")
    plain_card, _ = untrained_model(SMALL_CONFIG, calibration, "metal")
    plain = PatchModel.from_state(plain_card, state, device="cpu")  # the same weights, no flattening
    image = synth_image(9, 96, (DefectKind.SCRATCH,))[0].astype(np.float32) / 255

    local = anomaly_map(image, model)
    np.testing.assert_allclose(local, anomaly_map(Detrend(8.0)(image), plain), rtol=1e-5, atol=1e-7)
    assert np.abs(local - anomaly_map(image, plain)).max() > 1e-4  # it does change the map
    np.testing.assert_allclose(LocalInspector(model)(image).anomaly_map, local, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(inspect_in_ranges(model, image, 16).anomaly_map, local, rtol=1e-5, atol=1e-7)
