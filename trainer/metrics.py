"""Detection and segmentation metrics (method.md §6), pure numpy: no scikit-learn at runtime.

    image_auroc(scores, labels)          # scores (N,), labels (N,) bool: 1 = anomalous
    pixel_auroc(maps, masks)             # maps: list of (H, W) float, masks: list of (H, W) bool
    pixel_average_precision(maps, masks) # the honest pixel metric when defects cover ~0.1 % of pixels
    aupro(maps, masks, max_fpr=0.3)      # per-region overlap up to 30 % FPR, normalised to [0, 1]

Ties are handled exactly as scikit-learn does (AUROC counts a tied positive/negative pair as half;
AP steps over each distinct score). The pixel metrics pool all pixels of all images; above
``max_pixels`` pixels they use a fixed pseudo-random subset (seed 0) drawn per class: every defect
pixel is kept while they fit in half the budget, and normal pixels fill the rest. AUROC and AUPRO do
not depend on how many pixels of each class are drawn; AP counts each kept normal pixel as the
1/rate pixels it stands for. Results stay deterministic, and memory stays bounded: the subset is drawn
map by map, so beyond the maps themselves the metrics hold about 10 bytes per pixel of the largest map
and about 60 bytes per pooled pixel. Every metric raises ValueError when only one class is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MAX_PIXELS = 1 << 24
"""Pixels pooled by the pixel metrics before subsampling: 16 images of 1024²."""
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _binary(labels: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(labels)
    if values.dtype != np.bool_:
        if not np.isin(values, (0, 1)).all():
            msg = f"{what} must be boolean or 0/1, got values {np.unique(values)[:5].tolist()}"
            raise ValueError(msg)
        values = values.astype(bool)
    return values


def _check_two_classes(labels: np.ndarray, what: str) -> None:
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0 or n_pos == labels.size:
        present = "anomalous" if n_pos else "normal"
        msg = f"{what} needs both normal and anomalous samples, got only {present} ({labels.size} samples)"
        raise ValueError(msg)


def _ranked(scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Order of ``scores`` (N,) from the highest down, and the last position of each run of ties."""
    if not np.isfinite(scores).all():
        msg = f"{what}: scores must be finite, got NaN or infinite values"
        raise ValueError(msg)
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    return order, last_of_each


def _curve(scores: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true positives, false positives) at each distinct score, from the highest down.

    Both (T,) float64, as scikit-learn's ``_binary_clf_curve``; raises ValueError with one class only.
    """
    _check_two_classes(labels, what)
    order, last_of_each = _ranked(scores, what)
    tps = np.cumsum(labels[order], dtype=np.float64)[last_of_each]
    fps = 1.0 + last_of_each - tps
    return tps, fps


def _auroc(scores: np.ndarray, labels: np.ndarray, what: str) -> float:
    tps, fps = _curve(scores, labels, what)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def image_auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of image scores (N,) against labels (N,) (True / 1 = anomalous)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    truth = _binary(np.asarray(labels).ravel(), "labels")
    if values.shape != truth.shape:
        msg = f"scores and labels differ in length: {values.size} vs {truth.size}"
        raise ValueError(msg)
    return _auroc(values, truth, "image AUROC")


@dataclass(frozen=True)
class PixelSample:
    """The pooled pixels of a set of maps: all of them, or a per-class random subset.

    ``scores`` (N,) float32, ``labels`` (N,) bool (True = defect), ``regions`` (N,) int32 (the
    8-connected ground-truth region of each defect pixel, numbered from 1 across all masks; 0 for
    normal pixels) or None when not asked for; ``n_regions`` regions in all. ``defect_rate`` and
    ``normal_rate`` are the fractions of each class kept (1.0 when nothing was dropped).
    """

    scores: np.ndarray
    labels: np.ndarray
    regions: np.ndarray | None
    n_regions: int
    defect_rate: float
    normal_rate: float


def _class_rates(n_defect: int, n_normal: int, max_pixels: int) -> tuple[float, float]:
    """Fractions of defect and normal pixels to keep so that about ``max_pixels`` remain.

    Defect pixels (usually ~0.1 %) are all kept while they fit in half the budget; normal pixels
    fill what is left, so a rare class is never subsampled away.
    """
    if n_defect + n_normal <= max_pixels:
        return 1.0, 1.0
    keep_defect = min(n_defect, max(max_pixels // 2, max_pixels - n_normal))
    keep_normal = min(n_normal, max_pixels - keep_defect)
    return keep_defect / max(n_defect, 1), keep_normal / max(n_normal, 1)


def pool_pixels(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_pixels: int, *, regions: bool = False
) -> PixelSample:
    """Pool maps [(H, W) float] and masks [(H, W) bool or 0/1], keeping about ``max_pixels`` pixels.

    The subset is drawn map by map with a generator seeded 0, at `_class_rates`' rate per class, so it
    is the same on every call. With ``regions``, each defect pixel carries its ground-truth region.
    """
    if len(maps) != len(masks) or len(maps) == 0:
        msg = f"need the same, non-zero number of maps and masks, got {len(maps)} and {len(masks)}"
        raise ValueError(msg)
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        if np.ndim(m) != 2 or np.shape(m) != np.shape(g):
            msg = f"map {i} has shape {np.shape(m)} and mask {i} {np.shape(g)}; expected the same (H, W)"
            raise ValueError(msg)
    truths = [_binary(g, f"mask {i}") for i, g in enumerate(masks)]
    n_defect = sum(int(np.count_nonzero(t)) for t in truths)
    n_all = sum(t.size for t in truths)
    defect_rate, normal_rate = _class_rates(n_defect, n_all - n_defect, max_pixels)
    subsample = defect_rate < 1.0 or normal_rate < 1.0
    rng = np.random.default_rng(0)
    scores, labels, region_ids = [], [], []
    n_regions = 0
    for m, truth in zip(maps, truths, strict=True):
        flat_truth = truth.ravel()
        keep: np.ndarray | slice = slice(None)
        if subsample:
            keep = rng.random(flat_truth.size, dtype=np.float32) < np.where(flat_truth, defect_rate, normal_rate)
        scores.append(np.asarray(m, dtype=np.float32).ravel()[keep])
        labels.append(flat_truth[keep])
        if regions:
            labelled, n = ndimage.label(truth, structure=_EIGHT_CONNECTED)
            ids = labelled.ravel()[keep].astype(np.int32)
            region_ids.append(np.where(ids > 0, ids + n_regions, 0).astype(np.int32))
            n_regions += n
    return PixelSample(
        scores=np.concatenate(scores),
        labels=np.concatenate(labels),
        regions=np.concatenate(region_ids) if regions else None,
        n_regions=n_regions,
        defect_rate=defect_rate,
        normal_rate=normal_rate,
    )


def precision_recall_steps(
    scores: np.ndarray, labels: np.ndarray, normal_rate: float = 1.0, defect_rate: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall (T,) each at every distinct score of (N,) ``scores``, from the highest down.

    A kept pixel stands for 1/rate pixels of its class, so a class-subsampled pool gives the
    precision of the full set. Raises ValueError when only one class is present.
    """
    tps, fps = _curve(scores, labels, "precision/recall")
    weighted_tps, weighted_fps = tps / defect_rate, fps / normal_rate
    return weighted_tps / (weighted_tps + weighted_fps), tps / tps[-1]


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_pixels: int = MAX_PIXELS) -> float:
    """Pixel-level AUROC of maps [(H, W) float] against ground-truth masks [(H, W) bool], pooled."""
    sample = pool_pixels(maps, masks, max_pixels)
    return _auroc(sample.scores, sample.labels, "pixel AUROC")


def pixel_average_precision(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_pixels: int = MAX_PIXELS
) -> float:
    """Pixel-level average precision, pooled: Σ_k (R_k − R_{k−1})·P_k over distinct scores (as sklearn)."""
    sample = pool_pixels(maps, masks, max_pixels)
    _check_two_classes(sample.labels, "pixel average precision")
    precision, recall = precision_recall_steps(sample.scores, sample.labels, sample.normal_rate, sample.defect_rate)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupro(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    max_fpr: float = 0.3,
    max_pixels: int = MAX_PIXELS,
) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, divided by ``max_fpr`` (MVTec AD).

    Ground-truth regions are the 8-connected components of each (H, W) mask. At each threshold t,
    PRO(t) is the mean over all regions of the fraction of the region's pixels with score >= t, and
    FPR(t) the fraction of all normal pixels (of every image) with score >= t. The curve, from
    (0, 0) to (1, 1), is integrated by trapezoids up to ``max_fpr``, interpolating linearly there, as
    in the MVTec AD evaluation code. 1.0 is perfect; random scores give about max_fpr / 2.
    """
    if not 0.0 < max_fpr <= 1.0:
        msg = f"max_fpr must be in (0, 1], got {max_fpr}"
        raise ValueError(msg)
    sample = pool_pixels(maps, masks, max_pixels, regions=True)
    scores, labels, regions = sample.scores, sample.labels, sample.regions
    assert regions is not None
    sizes = np.bincount(regions, minlength=sample.n_regions + 1).astype(np.float64)
    present = int(np.count_nonzero(sizes[1:]))  # regions with no pixel left after subsampling drop out
    weights = np.zeros_like(sizes)
    weights[1:][sizes[1:] > 0] = 1.0 / sizes[1:][sizes[1:] > 0]
    _check_two_classes(labels, "AUPRO")
    order, last_of_each = _ranked(scores, "AUPRO")
    fpr = np.cumsum(~labels[order], dtype=np.float64)[last_of_each] / np.count_nonzero(~labels)
    pro = np.cumsum(weights[regions[order]])[last_of_each] / present
    fpr = np.minimum(np.r_[0.0, fpr, 1.0], 1.0)
    pro = np.minimum(np.r_[0.0, pro, 1.0], 1.0)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max]; x (K,) ascending from 0, ending >= x_max."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.sum(np.diff(x[:inside]) * (y[1:inside] + y[: inside - 1]) / 2.0))
    if inside < x.size and x[inside - 1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += (x_max - x0) * (y0 + y_at) / 2.0
    return area
