"""Which way a surface's grain runs, measured on its training images (`find_grain`, `with_grain`).

`trainer.detrend` flattens images along their grain, and only along it: on the synthetic brushed metal an
isotropic blur gained nothing where the blur along the brushing lifted pixel AP fourfold
(docs/benchmarks.md, "Flattening the grain"). A camera line's engineer may not know which way that is
in image coordinates, and a surface with no grain (cast, painted, woven) should not be flattened at all:
subtracting a blur along rows would also dim defects that run along rows. So ``anomap train``
measures it::

    grain = find_grain(train_images, sigma=12.0)   # images (H, W) uint8 / uint16 / float in [0, 1]
    grain.axis          # DetrendAxis.X (grain along rows), DetrendAxis.Y, or None (no grain)
    grain.anisotropy    # median over the images of R_y / R_x (below)
    config = with_grain(config, train_images)       # detrend_axis set, or detrend_sigma 0 when there is none

The measure: R_x is the mean square of an image minus its blur of σ px along x (what flattening along x
leaves), R_y the same along y. Streaks that run along x survive a blur along x and not one along y, so a
grain along x makes R_y / R_x large: 6.9–8.5 on the synthetic metal at 256² and 1024², 0.12–0.15 on the
same images transposed, 1.00–1.02 on isotropic noise (docs/benchmarks.md, "Which way the grain
runs"). A ratio of at least `GRAIN_RATIO` (or at most its inverse) is a grain.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from trainer.config import TrainConfig
from trainer.detrend import DetrendAxis
from trainer.patches import as_unit_float

GRAIN_RATIO = 2.0
"""R_y / R_x at or above which the grain runs along x (at or below 1 / it: along y); between: no grain.
Halfway, on a log scale, between isotropic texture (1) and the synthetic brushing (~7)."""

MAX_SAMPLED_IMAGES = 16
"""At most this many images (evenly spaced through the list) are measured: 1–2.5 s at 1024² on one core."""

_FLOOR = 1e-12
"""Added to both energies so that a perfectly flat image reads as isotropic (ratio 1), not 0 / 0."""


@dataclass(frozen=True)
class Grain:
    """What `find_grain` measured: the grain's axis (None: no grain) and the median R_y / R_x."""

    axis: DetrendAxis | None
    anisotropy: float
    n_images: int

    def describe(self) -> str:
        """One line for an operator, e.g. ``grain along x (R_y / R_x = 7.8, median of 16 images)``."""
        where = f"grain along {self.axis}" if self.axis is not None else "no grain"
        return f"{where} (R_y / R_x = {self.anisotropy:.2f}, median of {self.n_images} images)"


def anisotropy(image: np.ndarray, sigma: float) -> float:
    """R_y / R_x of one (H, W) image (uint8, uint16 or float in [0, 1]) for a blur of ``sigma`` px (> 0)."""
    if not (sigma > 0 and math.isfinite(sigma)):
        msg = f"sigma must be a finite number > 0 (pixels), got {sigma}"
        raise ValueError(msg)
    unit = as_unit_float(np.asarray(image))  # (H, W) float32
    energies = []
    for axis in (1, 0):  # along x, then along y
        left = unit - gaussian_filter1d(unit, sigma, axis=axis, mode="reflect")
        energies.append(float(np.mean(np.square(left, dtype=np.float64))) + _FLOOR)
    r_x, r_y = energies
    return r_y / r_x


def find_grain(images: Sequence[np.ndarray], sigma: float) -> Grain:
    """The grain of a set of (H, W) images: the median anisotropy of up to `MAX_SAMPLED_IMAGES` of them.

    Raises:
        ValueError: no images, or a ``sigma`` that is not > 0.
    """
    if not images:
        msg = "no images to measure the grain on"
        raise ValueError(msg)
    picks = np.unique(np.linspace(0, len(images) - 1, min(len(images), MAX_SAMPLED_IMAGES)).round().astype(int))
    ratio = float(np.median([anisotropy(images[i], sigma) for i in picks]))
    axis = None
    if ratio >= GRAIN_RATIO:
        axis = DetrendAxis.X
    elif ratio <= 1.0 / GRAIN_RATIO:
        axis = DetrendAxis.Y
    return Grain(axis, ratio, len(picks))


def with_grain(config: TrainConfig, images: Sequence[np.ndarray]) -> tuple[TrainConfig, Grain | None]:
    """``config`` flattened along the grain of ``images``, or not at all when they have none.

    Returns the config with ``detrend_axis`` set to the measured axis (``detrend_sigma`` kept), or with
    ``detrend_sigma`` 0 when there is no grain; and what was measured. A config that does not flatten
    (σ = 0) comes back unchanged, with None.
    """
    if config.detrend_sigma == 0:
        return config, None
    grain = find_grain(images, config.detrend_sigma)
    if grain.axis is None:
        return dataclasses.replace(config, detrend_sigma=0.0), grain
    return dataclasses.replace(config, detrend_axis=str(grain.axis)), grain
