"""From a raw anomaly map to what a result reports: image score, verdict and regions (pure).

The map is in raw units (whatever the scorer produces); thresholds come from the model card, and
every reported score is normalised so that 1.0 means "at threshold" (method.md §5)::

    summary = summarize_map(anomaly_map, card.thresholds)      # anomaly_map: (1024, 1024) float32
    summary.image_score       # max(map) / thresholds.image, e.g. 1.7
    summary.is_anomalous      # image_score >= 1.0
    summary.regions[0]        # Region(x=.., y=.., width=.., height=.., area=.., peak_score=2.3)

Regions are the 8-connected components of ``map >= pixel threshold``, strongest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from schemas import Region, Thresholds
from schemas.result import MAX_REGIONS

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_map(anomaly_map: np.ndarray) -> np.ndarray:
    values = np.asarray(anomaly_map)
    if values.ndim != 2 or values.size == 0:
        msg = f"expected a non-empty (H, W) anomaly map, got shape {values.shape}"
        raise ValueError(msg)
    if not np.isfinite(values).all():
        msg = f"anomaly map has {int((~np.isfinite(values)).sum())} NaN or infinite values; expected finite scores"
        raise ValueError(msg)
    return values


def image_score(anomaly_map: np.ndarray) -> float:
    """The raw image score of an (H, W) map: its maximum.

    The maximum follows the single strongest defect, however small; a scratch covers ~0.1 % of the
    pixels, so a mean or even a top-1 % mean would drown it. The map is smoothed before it gets
    here (method.md §4), which keeps a single noisy pixel from dominating.
    """
    return float(_check_map(anomaly_map).max())


@dataclass(frozen=True)
class MapSummary:
    """What a result reports about one map. Scores are normalised: 1.0 = at threshold."""

    raw_image_score: float
    image_score: float
    is_anomalous: bool
    regions: list[Region]
    regions_truncated: bool


def _region_peaks_and_areas(values: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-region maximum and pixel count of labels 1..n, from the labelled pixels only.

    The same numbers as ``ndimage.maximum(values, labels, index)`` and a bincount, but without
    that function's argsort of the whole map (~80 ms for 1024², most of a summary's cost).
    """
    inside = labels > 0
    region_of = labels[inside]  # (K,) labels of the K pixels above threshold
    peaks = np.full(n + 1, -np.inf, dtype=values.dtype)
    np.maximum.at(peaks, region_of, values[inside])
    areas = np.bincount(region_of, minlength=n + 1)
    return peaks[1:].astype(np.float64), areas[1:]


def summarize_map(
    anomaly_map: np.ndarray,
    thresholds: Thresholds,
    pixel_threshold: float | None = None,
    max_regions: int = MAX_REGIONS,
) -> MapSummary:
    """Summarise an (H, W) raw anomaly map against calibrated thresholds.

    ``image_score`` = max(map) / ``thresholds.image``; ``is_anomalous`` when it is >= 1.0. Regions are
    the 8-connected components of ``map >= pixel_threshold`` (default ``thresholds.pixel``): each
    with its bounding box, area (pixels above threshold) and ``peak_score`` = max / pixel threshold,
    sorted by peak (then top-left position), at most ``max_regions`` of them; ``regions_truncated``
    says whether more were found. Raises ValueError on a map that is not (H, W) and finite, or a
    pixel threshold that is not positive.
    """
    values = _check_map(anomaly_map)
    threshold = thresholds.pixel if pixel_threshold is None else float(pixel_threshold)
    if not np.isfinite(threshold) or threshold <= 0:
        msg = f"pixel threshold must be a positive number, got {threshold}"
        raise ValueError(msg)
    if max_regions < 0:
        msg = f"max_regions must be >= 0, got {max_regions}"
        raise ValueError(msg)
    raw = float(values.max())
    normalised = raw / thresholds.image
    labels, n = ndimage.label(values >= threshold, structure=_EIGHT_CONNECTED)
    regions: list[Region] = []
    if n:
        peaks, areas = _region_peaks_and_areas(values, labels, n)
        boxes = ndimage.find_objects(labels)
        tops = np.array([box[0].start for box in boxes])
        lefts = np.array([box[1].start for box in boxes])
        order = np.lexsort((lefts, tops, -peaks))[:max_regions]
        for i in order:
            rows, cols = boxes[i]
            regions.append(
                Region(
                    x=cols.start,
                    y=rows.start,
                    width=cols.stop - cols.start,
                    height=rows.stop - rows.start,
                    area=int(areas[i]),
                    peak_score=float(peaks[i] / threshold),
                )
            )
    return MapSummary(
        raw_image_score=raw,
        image_score=normalised,
        is_anomalous=normalised >= 1.0,
        regions=regions,
        regions_truncated=n > max_regions,
    )
