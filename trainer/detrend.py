"""Flattening an image's slow background along its grain before the networks see it (`Detrend`).

A brushed or rolled surface carries streaks: intensity that drifts slowly along the grain and changes
row to row. A patch GAN reproduces them only roughly, so they dominate its residual and bury 1–2 px
defects (docs/benchmarks.md, "Flattening the grain"). Subtracting the image's Gaussian blur *along* the
grain removes them and keeps everything that runs across it::

    flat = Detrend(sigma=12.0, axis=DetrendAxis.X)(unit)   # (H, W) in [0, 1] -> (H, W) float32, about 0.5
    flat = Detrend.of(card.train_config)(unit)              # what a model version was trained with

Training images, abnormal images, calibration images and every image scored go through the same
`Detrend` (the version's ``TrainConfig.detrend_sigma`` / ``detrend_axis``), so the model always sees
the same kind of input; σ = 0 (the library default, and every version trained before this existed) is
the identity. Maps, overlays and regions stay in the original image's pixel grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from trainer.patches import as_unit_float

FLAT_LEVEL = 0.5
"""Where a flattened image is centred (its background's level), in [0, 1] intensity units."""


class DetrendAxis(StrEnum):
    """Which way the blur that is subtracted runs: along the grain."""

    X = "x"
    """Along rows: the grain runs left to right (the synthetic metal's brushing)."""
    Y = "y"
    """Along columns: the grain runs top to bottom."""
    XY = "xy"
    """Both ways (an isotropic blur): a plain background subtraction, for surfaces without a grain."""


def detrend(unit: np.ndarray, sigma: float, axis: DetrendAxis | str = DetrendAxis.X) -> np.ndarray:
    """``unit`` minus its Gaussian blur of ``sigma`` px along ``axis``, plus `FLAT_LEVEL`.

    Args:
        unit: (H, W) float image in [0, 1] (uint8 and uint16 are scaled to it).
        sigma: the blur's σ in pixels; 0 returns a float32 copy of ``unit`` unchanged.
        axis: `DetrendAxis` (``x``, ``y`` or ``xy``).

    Returns:
        (H, W) float32; borders are reflected (scipy's ``reflect``), so every row (for ``x``) is flattened
        on its own and a band of rows gives the same result as the whole image.
    """
    axis = _axis(axis)
    _check_sigma(sigma)
    image = as_unit_float(np.asarray(unit))  # (H, W) only; uint8 / uint16 scaled to [0, 1]; float32
    if sigma == 0:
        return image.copy()
    if axis is DetrendAxis.XY:
        background = gaussian_filter(image, sigma, mode="reflect")
    else:
        background = gaussian_filter1d(image, sigma, axis=1 if axis is DetrendAxis.X else 0, mode="reflect")
    background -= FLAT_LEVEL
    return np.subtract(image, background, out=background)


@dataclass(frozen=True)
class Detrend:
    """A version's input flattening: `detrend` with its σ and axis (σ = 0: the identity)."""

    sigma: float = 0.0
    axis: DetrendAxis = DetrendAxis.X

    def __post_init__(self) -> None:
        _check_sigma(self.sigma)
        object.__setattr__(self, "axis", _axis(self.axis))

    @classmethod
    def of(cls, train_config: Mapping[str, Any]) -> Detrend:
        """The flattening of a `TrainConfig` dict (``ModelCard.train_config``); older versions have none."""
        return cls(float(train_config.get("detrend_sigma") or 0.0), train_config.get("detrend_axis") or DetrendAxis.X)

    @property
    def active(self) -> bool:
        """Whether this changes images at all."""
        return self.sigma > 0

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        """(H, W) in [0, 1] (uint8 / uint16 scaled) -> (H, W) float32; ``unit`` itself when inactive (no copy)."""
        return detrend(unit, self.sigma, self.axis) if self.active else unit

    def images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Each (H, W) image (uint8, uint16 or float in [0, 1]) flattened; the images themselves when inactive."""
        if not self.active:
            return images
        return [self(np.asarray(image)) for image in images]


def _axis(axis: DetrendAxis | str) -> DetrendAxis:
    try:
        return DetrendAxis(axis)
    except ValueError:
        msg = f"detrend axis must be one of {[str(a) for a in DetrendAxis]}, got {axis!r}"
        raise ValueError(msg) from None


def _check_sigma(sigma: float) -> None:
    if not (sigma >= 0 and math.isfinite(sigma)):
        msg = f"detrend sigma must be a finite number >= 0 (pixels), got {sigma}"
        raise ValueError(msg)
