"""Measuring which way a surface's grain runs (`trainer.grain`), and what `anomap train` makes of it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from trainer.config import TrainConfig
from trainer.detrend import DetrendAxis
from trainer.grain import GRAIN_RATIO, MAX_SAMPLED_IMAGES, anisotropy, find_grain, with_grain
from trainer.synthetic import synth_image


def _brushed(n: int, size: int = 128) -> list[np.ndarray]:
    """Synthetic metal, brushed along x: (size, size) uint8 each."""
    return [synth_image(seed, size)[0] for seed in range(n)]


def _isotropic(n: int, size: int = 128) -> list[np.ndarray]:
    """Blurred white noise, the same in every direction: (size, size) uint8 each."""
    rng = np.random.default_rng(0)
    fields = [gaussian_filter(rng.standard_normal((size, size)), 2.0) for _ in range(n)]
    return [np.clip(128 + 40 * f / f.std(), 0, 255).astype(np.uint8) for f in fields]


def test_brushed_metal_has_its_grain_along_x_and_transposed_along_y() -> None:
    images = _brushed(3)
    along_x = find_grain(images, sigma=12.0)
    along_y = find_grain([image.T for image in images], sigma=12.0)
    assert along_x.axis is DetrendAxis.X and along_x.anisotropy > 3 * GRAIN_RATIO
    assert along_y.axis is DetrendAxis.Y and along_y.anisotropy < 1 / (3 * GRAIN_RATIO)
    assert along_x.describe().startswith("grain along x (R_y / R_x = ")


def test_isotropic_texture_and_a_flat_image_have_no_grain() -> None:
    grain = find_grain(_isotropic(3), sigma=12.0)
    assert grain.axis is None and 0.9 < grain.anisotropy < 1.1
    assert grain.describe().startswith("no grain")
    assert anisotropy(np.full((64, 64), 0.5, dtype=np.float32), sigma=6.0) == 1.0


def test_anisotropy_is_the_same_in_8_bit_16_bit_and_unit_float() -> None:
    image = _brushed(1, size=64)[0]
    as_float = anisotropy(image.astype(np.float32) / 255.0, sigma=6.0)
    assert anisotropy(image, sigma=6.0) == pytest.approx(as_float, rel=1e-4)
    assert anisotropy(image.astype(np.uint16) * 257, sigma=6.0) == pytest.approx(as_float, rel=1e-4)


def test_many_images_are_sampled_evenly_and_the_median_decides() -> None:
    images = _isotropic(MAX_SAMPLED_IMAGES + 9, size=48)
    assert find_grain(images, sigma=6.0).n_images == MAX_SAMPLED_IMAGES
    brushed = _brushed(3, size=64)
    assert find_grain([*brushed, _isotropic(1, size=64)[0]], sigma=6.0).axis is DetrendAxis.X  # 3 of 4 brushed


@pytest.mark.parametrize(
    ("images", "sigma", "message"),
    [
        ([], 12.0, "no images to measure the grain on"),
        ([np.zeros((32, 32), np.uint8)], 0.0, "sigma must be a finite number > 0 (pixels), got 0.0"),
        ([np.zeros((32, 32, 3), np.uint8)], 12.0, "expected a greyscale (H, W) image, got shape (32, 32, 3)"),
    ],
)
def test_bad_input_is_named(images: list[np.ndarray], sigma: float, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_grain(images, sigma)


def test_with_grain_sets_the_axis_or_turns_flattening_off() -> None:
    config = TrainConfig.demo()  # flattens 12 px along x
    on_y, grain = with_grain(config, [image.T for image in _brushed(2)])
    assert grain is not None and (on_y.detrend_sigma, on_y.detrend_axis) == (12.0, "y")
    off, grain = with_grain(config, _isotropic(2))
    assert grain is not None and grain.axis is None and off.detrend_sigma == 0.0 and not off.detrend.active
    assert dataclasses.replace(off, detrend_sigma=12.0) == config  # nothing else changes
    unflattened = TrainConfig.demo(detrend_sigma=0.0)
    assert with_grain(unflattened, _brushed(1)) == (unflattened, None)
