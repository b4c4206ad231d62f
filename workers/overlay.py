"""A picture for people: the inspected image with its anomaly map laid over it.

    overlay = render_overlay(image, anomaly_map, pixel_threshold)   # (H, W, 3) uint8

Below threshold the image shows in grey; above it a red-to-yellow heat is blended in, strongest at
twice the threshold, and region outlines show where defects were found. Only the pixels above
threshold (usually a few per cent) are blended; the rest is the grey image, computed once.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def render_overlay(image: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Blend ``anomaly_map`` (H, W) over ``image`` (H, W) in [0, 1]; returns (H, W, 3) uint8."""
    if image.shape != anomaly_map.shape:
        msg = f"image {image.shape} and map {anomaly_map.shape} differ in shape"
        raise ValueError(msg)
    grey = np.clip(image, 0.0, 1.0).astype(np.float32)
    rgb = np.empty((*grey.shape, 3), dtype=np.uint8)
    rgb[...] = (grey * 255.0 + 0.5).astype(np.uint8)[..., None]  # (H, W) grey into all three channels
    above = anomaly_map >= pixel_threshold
    if not above.any():
        return rgb
    heat = np.clip((anomaly_map[above] / pixel_threshold - 1.0), 0.0, 1.0)  # (K,): 0 at threshold, 1 at 2×
    alpha = (0.45 + 0.45 * heat)[:, None]  # (K, 1)
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=1)  # (K, 3) red → yellow
    blended = grey[above][:, None] * (1.0 - alpha) + colour * alpha
    rgb[above] = (blended * 255.0 + 0.5).astype(np.uint8)
    edge = above & ~ndimage.binary_erosion(above, iterations=1)
    rgb[edge] = (255, 0, 0)  # (1, 0, 0) · 255 + 0.5, rounded down
    return rgb
