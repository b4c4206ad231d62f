"""The blob filter: each pixel of a map becomes its mean over a disc around it (pure).

A spot or pit is round, and a segment of the line filter (`trainer.line_filter`) longer than the spot is
wide sees it only over part of its length; a disc of about the spot's radius sees all of it. On a signed
residual the mean's magnitude counts: noise averages towards 0 over the disc's pixels, a dark (or bright)
spot keeps its depth::

    blobs = disc_mean(signed_residual, radius=3, signed=True)   # (1024, 1024) float32 -> (1024, 1024), >= 0
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from trainer.line_filter import Tap, as_map, padded_map, tap_sum

MAX_BLOB_RADIUS = 16
"""The largest disc a version may ask for (`schemas.ModelCard.blob_radius`'s bound)."""
BLOB_RADIUS = 3
"""The schedules' disc (29 px). On the signed maps at 1024² it lifted spots' pixel AP from .61 to .67 (three
seeds) for −.001 on scratches; radius 2 gave spots more (.58 on seed 0 against .52) and cost scratches .025
(docs/benchmarks.md, "Short segments and discs")."""


@lru_cache(maxsize=8)
def disc_kernel(radius: int) -> np.ndarray:
    """The mean over a disc of ``radius`` px: (K, K) float32 with K = 2·radius + 1, summing to 1.

    A pixel belongs to the disc where its squared distance from the kernel's centre is at most radius² + 0.5,
    so radius 1 is a plus of 5 px, radius 2 covers 13 px and radius 3 covers 29 px.
    """
    if radius < 1:
        msg = f"a disc's radius must be >= 1 pixel, got {radius}"
        raise ValueError(msg)
    offsets = np.arange(-radius, radius + 1)
    inside = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2 + 0.5
    out = (inside / inside.sum()).astype(np.float32)
    out.flags.writeable = False  # cached: shared by every caller
    return out


@lru_cache(maxsize=8)
def disc_taps(radius: int) -> tuple[Tap, ...]:
    """The pixels of `disc_kernel` ``(radius)`` as taps of weight 1 (`trainer.line_filter.tap_sum`)."""
    rows, cols = np.nonzero(disc_kernel(radius))
    return tuple((int(dy), int(dx), 1.0) for dy, dx in zip(rows, cols, strict=True))


def disc_mean(anomaly_map: np.ndarray, radius: int, *, signed: bool = False) -> np.ndarray:
    """The mean of an (H, W) map over the disc of ``radius`` px around each pixel -> (H, W) float32.

    ``signed``: the map is a signed residual and the mean's magnitude is returned (>= 0). Borders mirror
    the map as `trainer.line_filter.line_mean_max` does (repeating edge pixels on maps no wider than the
    radius). The sum runs over the disc's pixels as shifted adds (`trainer.line_filter.tap_sum`): 11 ms per
    1024² map on one core, against 40 ms for the dense 7 × 7 convolution.
    """
    values = as_map(anomaly_map)
    taps = disc_taps(radius)
    with torch.no_grad():
        means = tap_sum(padded_map(values, radius), taps, values.shape, torch.zeros(values.shape)).div_(len(taps))
        return (means.abs() if signed else means).numpy()
