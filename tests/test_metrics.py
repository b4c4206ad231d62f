"""Metrics against scikit-learn (ties included) and a brute-force AUPRO on tiny cases."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from trainer.metrics import aupro, image_auroc, pixel_auroc, pixel_average_precision


@pytest.mark.parametrize("seed", range(6))
def test_image_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(np.float64)  # many ties
    labels = rng.random(40) < 0.3
    labels[:2] = [True, False]
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_extremes() -> None:
    assert image_auroc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert image_auroc([0.9, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert image_auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


def _case(seed: int, n: int = 3, shape: tuple[int, int] = (12, 10)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks = [rng.random(shape) < 0.12 for _ in range(n)]
    maps = [np.round(rng.random(shape) + 0.6 * m, 1).astype(np.float32) for m in masks]  # rounded: ties
    masks[0][:] = False  # a normal image among them
    return maps, masks


@pytest.mark.parametrize("seed", range(6))
def test_pixel_auroc_and_ap_match_sklearn_with_ties(seed: int) -> None:
    maps, masks = _case(seed)
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([g.ravel() for g in masks])
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert pixel_average_precision(maps, masks) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def _brute_force_aupro(maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float) -> float:
    normal = np.concatenate([m[~g] for m, g in zip(maps, masks, strict=True)])
    regions = []
    for m, g in zip(maps, masks, strict=True):
        labels, n = ndimage.label(g, np.ones((3, 3)))
        regions += [m[labels == k] for k in range(1, n + 1)]
    xs, ys = [0.0, 1.0], [0.0, 1.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps])):
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    order = np.lexsort((ys, xs))
    x, y = np.array(xs)[order], np.array(ys)[order]
    area = 0.0
    for i in range(1, len(x)):  # integrate the piecewise-linear curve over [0, max_fpr]
        x0, x1 = x[i - 1], min(x[i], max_fpr)
        if x1 <= x0:
            continue
        y_end = y[i - 1] + (y[i] - y[i - 1]) * (x1 - x0) / (x[i] - x0)
        area += (x1 - x0) * (y[i - 1] + y_end) / 2
    return area / max_fpr


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed: int, max_fpr: float) -> None:
    maps, masks = _case(seed)
    assert aupro(maps, masks, max_fpr=max_fpr) == pytest.approx(_brute_force_aupro(maps, masks, max_fpr), abs=1e-9)


def test_aupro_weights_regions_equally() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True  # a large region, found
    mask[16, 16] = True  # a one-pixel region, missed
    values = np.where(mask, 1.0, 0.0).astype(np.float32)
    values[16, 16] = 0.0
    # curve (0, 0) -> (0, 0.5) -> (1, 1): half the regions found at zero FPR, however large the other
    assert aupro([values], [mask], max_fpr=0.3) == pytest.approx((0.5 + 0.65) / 2)
    assert pixel_auroc([values], [mask]) > 0.99


def test_perfect_and_inverted_maps() -> None:
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:8, 4:6] = True
    assert aupro([mask.astype(np.float32)], [mask]) == pytest.approx(1.0)
    assert pixel_average_precision([mask.astype(np.float32)], [mask]) == 1.0
    assert aupro([(~mask).astype(np.float32)], [mask]) == 0.0


def test_subsampling_is_deterministic_and_close() -> None:
    maps, masks = _case(0, n=4, shape=(64, 64))
    full = pixel_auroc(maps, masks)
    sub = pixel_auroc(maps, masks, max_pixels=8000)
    assert sub == pixel_auroc(maps, masks, max_pixels=8000)
    assert sub == pytest.approx(full, abs=0.03)
    assert aupro(maps, masks, max_pixels=8000) == pytest.approx(aupro(maps, masks), abs=0.05)


def test_subsampling_keeps_a_lone_defect_pixel() -> None:
    """Above the budget, normal pixels are drawn and every defect pixel kept: one defect pixel in
    20 480 still yields the metrics, not a 'needs both classes' error."""
    rng = np.random.default_rng(1)
    maps = [rng.random((64, 64)).astype(np.float32) for _ in range(5)]
    masks = [np.zeros((64, 64), dtype=bool) for _ in range(5)]
    masks[0][0, 0] = True
    maps[0][0, 0] = 0.99
    assert pixel_auroc(maps, masks, max_pixels=1000) == pytest.approx(pixel_auroc(maps, masks), abs=0.02)
    assert aupro(maps, masks, max_pixels=1000) == pytest.approx(aupro(maps, masks), abs=0.05)
    assert pixel_average_precision(maps, masks, max_pixels=1000) == pytest.approx(
        pixel_average_precision(maps, masks), abs=0.1
    )


def test_subsampled_average_precision_weighs_the_drawn_normal_pixels() -> None:
    """Keeping every defect pixel but 1 in 6 normal ones would inflate precision; AP stays the full one."""
    rng = np.random.default_rng(2)
    maps = [rng.normal(size=(128, 128)).astype(np.float32) for _ in range(8)]
    masks = [np.zeros((128, 128), dtype=bool) for _ in range(8)]
    for m, g in zip(maps, masks, strict=True):
        g[10:14, 20:40] = True
        m[g] += 2.0
    full = pixel_average_precision(maps, masks)
    assert pixel_average_precision(maps, masks, max_pixels=20_000) == pytest.approx(full, abs=0.02)


def test_pixel_metrics_memory_does_not_grow_with_the_pooled_pixels() -> None:
    """Subsets are drawn map by map: 16 maps of 256² pooled down to 4096 pixels stay far below the
    10 bytes per input pixel that drawing over the concatenated pool cost."""
    rng = np.random.default_rng(3)
    maps = [rng.random((256, 256)).astype(np.float32) for _ in range(16)]
    masks = [np.zeros((256, 256), dtype=bool) for _ in range(16)]
    for g in masks:
        g[5:9, 5:50] = True
    pixels = 16 * 256 * 256
    for metric in (pixel_auroc, aupro):
        tracemalloc.start()
        try:
            metric(maps, masks, max_pixels=4096)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak / pixels < 3.0, (metric.__name__, peak / pixels)


def test_one_class_is_rejected() -> None:
    with pytest.raises(ValueError, match="only normal"):
        image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="only anomalous"):
        image_auroc([0.1, 0.2], [True, True])
    quiet = [np.zeros((8, 8), dtype=bool)]
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pixel_auroc([np.zeros((8, 8))], quiet)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        aupro([np.zeros((8, 8))], quiet)
    with pytest.raises(ValueError, match="same"):
        pixel_average_precision([np.zeros((8, 8))], [np.zeros((8, 9), dtype=bool)])
