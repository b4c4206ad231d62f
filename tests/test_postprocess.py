"""From a raw anomaly map to scores and regions: normalised so that 1.0 = at threshold."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from schemas import Region, Thresholds
from trainer.postprocess import image_score, summarize_map

THRESHOLDS = Thresholds(pixel=0.5, image=2.0, pixel_quantile=0.999, image_quantile=0.99, n_calibration_images=4)


def _map_with_blobs() -> np.ndarray:
    values = np.full((64, 64), 0.1, dtype=np.float32)
    values[10:13, 20:30] = 0.8  # 30 px, peak 0.8
    values[11, 25] = 1.2
    values[40:50, 5:7] = 3.0  # 20 px, peak 3.0
    values[60, 60] = 0.5  # exactly at threshold: counts
    return values


def test_image_score_is_the_maximum() -> None:
    assert image_score(_map_with_blobs()) == pytest.approx(3.0)


def test_regions_have_boxes_areas_and_normalised_peaks_strongest_first() -> None:
    summary = summarize_map(_map_with_blobs(), THRESHOLDS)
    assert summary.raw_image_score == pytest.approx(3.0)
    assert summary.image_score == pytest.approx(1.5)
    assert summary.is_anomalous
    boxes = [(r.x, r.y, r.width, r.height, r.area) for r in summary.regions]
    assert boxes == [(5, 40, 2, 10, 20), (20, 10, 10, 3, 30), (60, 60, 1, 1, 1)]
    assert [r.peak_score for r in summary.regions] == pytest.approx([6.0, 2.4, 1.0])
    assert all(isinstance(r, Region) for r in summary.regions)
    assert not summary.regions_truncated


def test_diagonal_neighbours_are_one_region() -> None:
    values = np.zeros((16, 16), dtype=np.float32)
    values[np.arange(2, 10), np.arange(2, 10)] = 1.0  # a one-pixel diagonal scratch
    summary = summarize_map(values, THRESHOLDS)
    assert len(summary.regions) == 1
    assert summary.regions[0].area == 8
    assert (summary.regions[0].width, summary.regions[0].height) == (8, 8)


def test_quiet_map_is_normal_with_no_regions() -> None:
    summary = summarize_map(np.full((32, 32), 0.2, dtype=np.float32), THRESHOLDS)
    assert summary.image_score == pytest.approx(0.1)
    assert not summary.is_anomalous
    assert summary.regions == []


def test_at_image_threshold_is_anomalous() -> None:
    values = np.zeros((8, 8), dtype=np.float32)
    values[0, 0] = 2.0
    assert summarize_map(values, THRESHOLDS).is_anomalous


def test_pixel_threshold_override() -> None:
    summary = summarize_map(_map_with_blobs(), THRESHOLDS, pixel_threshold=1.0)
    assert [r.peak_score for r in summary.regions] == [pytest.approx(3.0), pytest.approx(1.2)]
    assert [r.area for r in summary.regions] == [20, 1]


def test_regions_are_truncated_to_the_strongest() -> None:
    values = np.zeros((40, 40), dtype=np.float32)
    for i in range(10):
        values[4 * (i // 5) + 1, 4 * (i % 5) + 1] = 1.0 + i
    summary = summarize_map(values, THRESHOLDS, max_regions=3)
    assert [r.peak_score for r in summary.regions] == [pytest.approx(2 * (10.0 - k)) for k in range(3)]
    assert summary.regions_truncated


def test_bad_maps_and_thresholds_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        summarize_map(np.zeros((2, 3, 4)), THRESHOLDS)
    with pytest.raises(ValueError, match="NaN"):
        image_score(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="positive"):
        summarize_map(np.zeros((4, 4)), THRESHOLDS, pixel_threshold=0.0)


def test_region_peaks_and_areas_are_scipys_on_a_map_with_many_regions() -> None:
    values = ndimage.gaussian_filter(np.random.default_rng(0).random((256, 256)).astype(np.float32), 1.5)
    threshold = float(np.quantile(values, 0.9))
    summary = summarize_map(values, THRESHOLDS, pixel_threshold=threshold, max_regions=10_000)
    labels, n = ndimage.label(values >= threshold, structure=np.ones((3, 3), dtype=bool))
    assert n > 50 and len(summary.regions) == n
    peaks = ndimage.maximum(values, labels, np.arange(1, n + 1))
    areas = np.bincount(labels.ravel())[1:]
    expected = sorted(
        (
            rows.start,
            cols.start,
            rows.stop - rows.start,
            cols.stop - cols.start,
            int(areas[i]),
            float(peaks[i]) / threshold,
        )
        for i, (rows, cols) in enumerate(ndimage.find_objects(labels))
    )
    got = sorted((r.y, r.x, r.height, r.width, r.area, r.peak_score) for r in summary.regions)
    assert got == expected
