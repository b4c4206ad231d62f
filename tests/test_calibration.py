"""Thresholds from held-out normal maps: quantiles, exactly as numpy computes them."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from trainer.calibration import MIN_CALIBRATION_IMAGES, MIN_THRESHOLD, calibrate, calibration_warnings


def _maps(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 0.1, size=(48, 40 + 8 * i)).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize("q", [0.5, 0.99, 0.999, 0.9999])
def test_pixel_threshold_is_the_quantile_of_all_pixels(q: float) -> None:
    maps = _maps(5)
    thresholds = calibrate(maps, pixel_quantile=q)
    expected = np.quantile(np.concatenate([m.ravel() for m in maps]).astype(np.float64), q)
    assert thresholds.pixel == pytest.approx(expected, rel=1e-12)
    assert thresholds.pixel_quantile == q


def test_pixel_quantile_with_ties() -> None:
    maps = [np.ones((16, 16), dtype=np.float32), np.full((16, 16), 2.0, dtype=np.float32)]
    maps[1][0, :3] = 5.0
    thresholds = calibrate(maps, pixel_quantile=0.995)
    expected = np.quantile(np.concatenate([m.ravel() for m in maps]).astype(np.float64), 0.995)
    assert thresholds.pixel == pytest.approx(expected, rel=1e-12)


def test_image_threshold_is_the_quantile_of_map_maxima() -> None:
    maps = _maps(6, seed=1)
    thresholds = calibrate(maps, image_quantile=0.9)
    assert thresholds.image == pytest.approx(np.quantile([m.max() for m in maps], 0.9))
    assert thresholds.n_calibration_images == 6


def test_few_images_put_the_image_threshold_near_the_largest_score() -> None:
    maps = _maps(4, seed=2)
    maxima = sorted(float(m.max()) for m in maps)
    assert maxima[-2] <= calibrate(maps).image <= maxima[-1]
    assert calibrate(maps, image_quantile=1.0).image == pytest.approx(maxima[-1])


def test_all_zero_maps_give_a_tiny_positive_floor() -> None:
    thresholds = calibrate([np.zeros((8, 8), dtype=np.float32)])
    assert thresholds.pixel == MIN_THRESHOLD and thresholds.image == MIN_THRESHOLD


def test_empty_or_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        calibrate([])
    with pytest.raises(ValueError, match="pixel_quantile"):
        calibrate(_maps(1), pixel_quantile=1.0)
    with pytest.raises(ValueError, match="finite"):
        calibrate([np.full((4, 4), np.inf)])


def test_few_calibration_images_warn_and_the_thresholds_say_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer.calibration"):
        one = calibrate(_maps(1))
    assert one.n_calibration_images == 1
    assert len(one.warnings) == 1 and "calibrated on 1 held-out normal image " in one.warnings[0]
    assert "that one image's score" in one.warnings[0]
    assert one.image == pytest.approx(float(_maps(1)[0].max()))  # still calibrated: small demos train on few
    assert [record.getMessage() for record in caplog.records] == [f"thresholds {one.warnings[0]}"]
    few = calibrate(_maps(MIN_CALIBRATION_IMAGES - 1))
    assert few.warnings == calibration_warnings(MIN_CALIBRATION_IMAGES - 1)
    assert f"{MIN_CALIBRATION_IMAGES - 1} held-out normal images" in few.warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.calibration"):
        enough = calibrate(_maps(MIN_CALIBRATION_IMAGES))
    assert enough.warnings == () and caplog.records == []
