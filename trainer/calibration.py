"""Thresholds from the anomaly maps of held-out normal images (method.md §5), pure numpy.

    thresholds = calibrate([scorer(img) for img in calibration_images])   # maps: (H, W) float32 each
    thresholds.pixel    # 0.999 quantile of all their pixel scores
    thresholds.image    # 0.99 quantile of their image scores (max of each map)

The images must be normal and must not have been trained on, or the thresholds come out too low.

How many images: the image threshold is a quantile of one number per image. With n images, the
``q`` quantile (linear interpolation) sits between the two largest scores as soon as
q·(n−1) > n−2, which for q = 0.99 is every n up to 100: in practice it is then close to the
largest normal score seen, and about 1 in n+1 new normal images will score above it. No margin
is added: the threshold is stored in the model card and can be adjusted at inference, and a
hidden factor would make the card's quantiles lie. Use more calibration images rather than a margin.
The pixel threshold is computed from ~10⁶ pixels per image and is stable with a few images.

Fewer than `MIN_CALIBRATION_IMAGES` images are allowed (demos and tests train on a handful), but
`calibrate` logs a warning and records it in ``Thresholds.warnings``, so the model card says that its
image threshold is about the largest of a few normal scores (with one image: that image's score).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from schemas import Thresholds
from trainer.postprocess import image_score

log = logging.getLogger(__name__)

MIN_THRESHOLD = 1e-9
"""Floor for both thresholds (they must be > 0): a model whose normal maps are all zero still works."""
MIN_CALIBRATION_IMAGES = 20
"""Fewer held-out normal images than this calibrate with a warning (see the module docstring)."""


def calibration_warnings(n_images: int) -> tuple[str, ...]:
    """What to say about thresholds calibrated on ``n_images`` images: one warning below `MIN_CALIBRATION_IMAGES`."""
    if n_images >= MIN_CALIBRATION_IMAGES:
        return ()
    scores = "that one image's score" if n_images == 1 else f"a quantile of only {n_images} image scores"
    return (
        f"calibrated on {n_images} held-out normal image{'s' if n_images != 1 else ''} "
        f"(fewer than {MIN_CALIBRATION_IMAGES}): the image threshold is {scores} and may flag many normal "
        "images; calibrate on more",
    )


def _pixel_quantile(flat_maps: Sequence[np.ndarray], q: float) -> float:
    """``np.quantile(np.concatenate(flat_maps), q)`` (linear), without concatenating them all.

    Only the largest ``N − ⌊q·(N−1)⌋`` values of all N pixels decide a high quantile, and they are
    among the largest that many of each map, so each map is cut down to those first.
    """
    total = sum(m.size for m in flat_maps)
    position = q * (total - 1)
    lo = int(np.floor(position))
    keep = total - lo  # values at ascending ranks lo .. total-1
    tails = [m if m.size <= keep else np.partition(m, m.size - keep)[m.size - keep :] for m in flat_maps]
    candidates = np.sort(np.concatenate(tails).astype(np.float64))
    start = candidates.size - keep  # ascending rank lo among all pixels
    low = candidates[start]
    high = candidates[start + 1] if keep > 1 else low
    return float(low + (position - lo) * (high - low))


def calibrate(
    normal_maps: Sequence[np.ndarray], pixel_quantile: float = 0.999, image_quantile: float = 0.99
) -> Thresholds:
    """Calibrate pixel and image thresholds from the (H, W) raw anomaly maps of normal images.

    Pixel threshold: the ``pixel_quantile`` of all pixels of all maps. Image threshold: the
    ``image_quantile`` of the maps' image scores (`trainer.postprocess.image_score`, the max). Both
    use linear interpolation, as `numpy.quantile`, and are floored at `MIN_THRESHOLD`. Maps may
    differ in size. Fewer than `MIN_CALIBRATION_IMAGES` maps log a warning and record it in the thresholds'
    ``warnings``. Raises ValueError on an empty list, a map that is not a finite non-empty (H, W)
    array, or a quantile outside (0, 1) (the image quantile may be 1: the largest score).
    """
    if len(normal_maps) == 0:
        msg = "calibrate needs the anomaly maps of at least one held-out normal image, got none"
        raise ValueError(msg)
    if not 0.0 < pixel_quantile < 1.0:
        msg = f"pixel_quantile must be in (0, 1), got {pixel_quantile}"
        raise ValueError(msg)
    if not 0.0 < image_quantile <= 1.0:
        msg = f"image_quantile must be in (0, 1], got {image_quantile}"
        raise ValueError(msg)
    scores = np.array([image_score(m) for m in normal_maps], dtype=np.float64)  # checks shape, finiteness
    pixel = _pixel_quantile([np.asarray(m).ravel() for m in normal_maps], pixel_quantile)
    image = float(np.quantile(scores, image_quantile))
    warnings = calibration_warnings(len(normal_maps))
    for warning in warnings:
        log.warning("thresholds %s", warning)
    return Thresholds(
        pixel=max(pixel, MIN_THRESHOLD),
        image=max(image, MIN_THRESHOLD),
        pixel_quantile=pixel_quantile,
        image_quantile=image_quantile,
        n_calibration_images=len(normal_maps),
        warnings=warnings,
    )
