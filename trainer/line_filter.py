"""The line filter: each pixel of a map becomes its strongest mean along a short straight segment (pure).

Scratches and cracks are thin and long; noise in a residual map is short and speckled. Averaging the
map along a segment of ``length`` px through each pixel, in each of ``directions`` orientations, and
keeping the largest of those means, keeps a line's full height wherever the segment lies along it and
averages noise down in every direction::

    lined = line_mean_max(residual_map, length=15)                  # (1024, 1024) float32 -> (1024, 1024)
    lined = line_mean_max(signed_residual, length=15, signed=True)  # the largest |mean|: >= 0
    lined = segment_mean_max(signed_residual, 15, short_weight=0.6, signed=True)  # also 7 px segments, × 0.6

On the flattened synthetic metal at 1024² it lifted pixel AUROC, pixel AP and AUPRO over a Gaussian
σ = 2 in every one of 18 runs, and image AUROC in 13 (docs/benchmarks.md, "The line filter"); round
defects narrower than the segment (spots) are dimmed by about their width over ``length``. On the
signed residual (``signed``), the grain's residual averages towards 0 instead of towards its mean
magnitude, and pixel AP rose again by ~×1.6 (docs/benchmarks.md, "Signed residuals").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

DIRECTIONS = 12
"""Orientations 180° / 12 = 15° apart: a segment of 15 px is then never more than ~1 px off a straight line."""
MAX_LINE_LENGTH = 64
"""The longest segment a version may ask for (`schemas.ModelCard.line_length`'s bound)."""
GAUSSIAN_FINISH_SIGMA = 2.0
"""The Gaussian σ (px) that finished every map before the line filter, and finishes it when the filter is off."""
SIGNED_FINISH_SIGMA = 0.7
"""The Gaussian σ (px) that smooths a signed map's line-filtered magnitude (`trainer.scoring.finish_map`): it
widens the 1 px ridge of a groove's response to the groove's width. 0.5 px gave a little more pixel AP for less
pixel AUROC and AUPRO, 0.85–1.5 px less pixel AP (docs/benchmarks.md, "Signed residuals")."""
SHORT_SEGMENT_WEIGHT = 0.6
"""The schedules' weight of the half-length segment in `segment_mean_max`. A 7 px segment averages noise less
than a 15 px one (its mean spreads √(15/7) ≈ 1.46× as much on white noise), so it counts at less than 1. On the
signed maps of three 1024² runs, 0.6 lifted pixel AUROC and AUPRO without costing pixel AP; 0.7–0.8 cost pixel
AP (docs/benchmarks.md, "Short segments and discs")."""
_SAMPLES_PER_PX = 4


def _segment_points(length: int, directions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A segment's points (4 per px) in a (K, K) kernel, K = ``length`` rounded up to odd, per orientation.

    Returns (y, x, point): y and x (directions, 4·length) int64 pixel indices of each point at
    i·180°/directions from the x axis, and point (4·length,) its position along the segment, the point
    at (point + 0.5) / 4 px from the centre.
    """
    if length < 1 or directions < 1:
        msg = f"line length and directions must be >= 1, got {length} and {directions}"
        raise ValueError(msg)
    size, samples = length | 1, _SAMPLES_PER_PX * length  # odd, so the segment has a centre pixel
    centre = size // 2
    t = (np.arange(samples) + 0.5) / samples * length - length / 2  # (S,) evenly along [-L/2, L/2]
    angles = np.pi * np.arange(directions)[:, None] / directions
    y = np.clip(np.rint(centre + t * np.sin(angles)), 0, size - 1).astype(np.int64)
    x = np.clip(np.rint(centre + t * np.cos(angles)), 0, size - 1).astype(np.int64)
    return y, x, np.arange(samples) - samples // 2


def _point_counts(y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """How many of the points (y, x) fall on each pixel of a (size, size) kernel, float64."""
    counts = np.zeros((size, size))
    np.add.at(counts, (y, x), 1.0)
    return counts


@lru_cache(maxsize=8)
def line_kernels(length: int, directions: int = DIRECTIONS) -> np.ndarray:
    """Mean-along-a-segment kernels, (directions, K, K) float32 with K = ``length`` rounded up to odd.

    Kernel i averages over a segment of ``length`` px through the centre at i·180°/directions from the
    x axis: each pixel weighs the share of the segment's points (4 per px) nearest to it, so the
    horizontal and vertical kernels are exact boxes of ``length`` px; every kernel sums to 1. The filter
    sums over their pixels (`segment_taps`); the kernels are its definition, and what tests compare it to.
    """
    y, x, point = _segment_points(length, directions)
    size = length | 1
    kernels = np.stack([_point_counts(y[i], x[i], size) for i in range(directions)]) / point.size
    out = kernels.astype(np.float32)
    out.flags.writeable = False  # cached: shared by every caller
    return out


Tap = tuple[int, int, float]
"""(dy, dx, weight): one pixel of a kernel, by its offset from the kernel's top-left corner."""


@lru_cache(maxsize=8)
def segment_taps(length: int, short: int, directions: int = DIRECTIONS) -> tuple[tuple[tuple[Tap, ...], ...], ...]:
    """Per orientation, the pixels of `line_kernels` ``(length, directions)`` as (inner, outer) taps.

    A tap's weight is the number of the segment's points (4 per px) that fall on its pixel. The inner taps
    hold the points within ``short`` px of the centre (``short`` <= ``length``; 0: none), which are the
    points of a ``short`` px segment, so one pass gives both sums: the inner taps' (4·short points) and,
    adding the outer taps', the whole segment's (4·length points).
    """
    if not 0 <= short <= length:
        msg = f"a short segment must be between 0 and the line length ({length}) pixels, got {short}"
        raise ValueError(msg)
    y, x, point = _segment_points(length, directions)
    inner = (point >= -_SAMPLES_PER_PX * short // 2) & (point < _SAMPLES_PER_PX * short // 2)
    out = []
    for i in range(directions):
        parts = []
        for chosen in (inner, ~inner):
            counts = _point_counts(y[i, chosen], x[i, chosen], length | 1)
            rows, cols = np.nonzero(counts)
            parts.append(tuple((int(dy), int(dx), float(counts[dy, dx])) for dy, dx in zip(rows, cols, strict=True)))
        out.append(tuple(parts))
    return tuple(out)


def as_map(anomaly_map: np.ndarray) -> np.ndarray:
    """``anomaly_map`` as a non-empty (H, W) float32 array, or a ValueError that names its shape."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2 or values.size == 0:
        msg = f"expected a non-empty (H, W) map, got shape {values.shape}"
        raise ValueError(msg)
    return values


def padded_map(values: np.ndarray, pad: int) -> torch.Tensor:
    """An (H, W) map mirrored by ``pad`` px on every side (without repeating the edge pixel), as a tensor; maps no
    wider than ``pad`` repeat their edge pixels instead."""
    x = torch.from_numpy(np.ascontiguousarray(values))[None, None]  # (1, 1, H, W)
    return F.pad(x, (pad, pad, pad, pad), mode="reflect" if min(values.shape) > pad else "replicate")[0, 0]


def tap_sum(padded: torch.Tensor, taps: tuple[Tap, ...], shape: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """``out`` += Σ weight × the padded map shifted by each tap's offset: a sparse kernel's correlation, (H, W)."""
    height, width = shape
    for dy, dx, weight in taps:
        out.add_(padded[dy : dy + height, dx : dx + width], alpha=weight)
    return out


def _segment_means(
    values: np.ndarray, length: int, short: int, directions: int, signed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The largest mean (|mean| if ``signed``) over ``length`` px segments and over ``short`` px ones (None for 0)."""
    taps = segment_taps(length, short, directions)  # first: it checks the lengths
    padded = padded_map(values, (length | 1) // 2)
    best_long: torch.Tensor | None = None
    best_short: torch.Tensor | None = None
    with torch.no_grad():
        for inner, outer in taps:
            total = tap_sum(padded, inner, values.shape, torch.zeros(values.shape))
            if short:
                mean = total / (_SAMPLES_PER_PX * short)
                mean = mean.abs_() if signed else mean
                best_short = mean if best_short is None else torch.maximum(best_short, mean, out=best_short)
            tap_sum(padded, outer, values.shape, total).div_(_SAMPLES_PER_PX * length)
            mean = total.abs_() if signed else total
            best_long = mean if best_long is None else torch.maximum(best_long, mean, out=best_long)
    assert best_long is not None  # directions >= 1
    return best_long, best_short


def line_mean_max(
    anomaly_map: np.ndarray, length: int, directions: int = DIRECTIONS, *, signed: bool = False
) -> np.ndarray:
    """The largest mean of an (H, W) map along any of ``directions`` segments of ``length`` px -> (H, W) float32.

    ``signed``: the map is a signed residual, and each mean's magnitude counts (the output is >= 0). Zero-mean
    noise then averages towards 0 along every segment, where the mean of a magnitude keeps its positive
    bias; a groove, one sign along its length, keeps its full depth.

    Borders mirror the map (without repeating the edge pixel: one bright pixel at an edge counts once, as
    inside; repeating it would give it half the weight of every segment across the edge, and the
    maps' maxima on normal images doubled that way). Maps no wider than half a segment repeat their
    edge pixels instead. ``length`` 1 returns the map (its magnitude if ``signed``) as float32. The means are the
    correlation with `line_kernels`, summed over each kernel's few pixels (`segment_taps`): 20–35 %
    faster than a dense convolution.
    """
    return _segment_means(as_map(anomaly_map), length, 0, directions, signed)[0].numpy()


def short_segment(length: int) -> int:
    """The half-length segment that goes with a line filter of ``length`` px: odd, >= 1 (15 -> 7, 16 -> 9)."""
    return (length // 2) | 1


def segment_mean_max(
    anomaly_map: np.ndarray, length: int, *, short_weight: float = 0.0, signed: bool = False
) -> np.ndarray:
    """`line_mean_max` over segments of ``length`` px, or ``short_weight`` × that over half-length ones, whichever
    is larger -> (H, W) float32.

    Where the generator draws part of a groove back, its residual comes and goes along it: a long segment
    averages the gaps in, a short one can lie on a stretch. It averages noise less, so it counts at a weight
    below 1 (`SHORT_SEGMENT_WEIGHT` in the schedules); on a clean, solid line it never wins. On the 1024²
    maps it decided ~12 % of the scratch masks' edge pixels and few of their centre lines, and the low
    values of the background, where the long segment's mean is small. ``short_weight`` 0 is
    `line_mean_max` alone.
    """
    if not 0.0 <= short_weight <= 1.0:
        msg = f"the short segment's weight must be in [0, 1], got {short_weight}"
        raise ValueError(msg)
    short = short_segment(length)
    if short_weight == 0.0 or short >= length:
        return line_mean_max(anomaly_map, length, signed=signed)
    lined, shorter = _segment_means(as_map(anomaly_map), length, short, DIRECTIONS, signed)
    assert shorter is not None
    return torch.maximum(lined, shorter.mul_(short_weight), out=lined).numpy()
