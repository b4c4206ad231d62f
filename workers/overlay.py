"""A picture for people: the inspected image with its anomaly map laid over it.

    overlay = render_overlay(image, anomaly_map, pixel_threshold)   # (H, W, 3) uint8

Below threshold the image shows in grey; above it a red-to-yellow heat is blended in, strongest at
twice the threshold, and region outlines show where defects were found.
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
    rgb = np.repeat(grey[..., None], 3, axis=2)
    heat = np.clip((anomaly_map / pixel_threshold - 1.0), 0.0, 1.0)  # 0 at threshold, 1 at 2× threshold
    above = anomaly_map >= pixel_threshold
    alpha = np.where(above, 0.45 + 0.45 * heat, 0.0)[..., None]
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=2)  # red → yellow
    rgb = rgb * (1.0 - alpha) + colour * alpha
    edge = above & ~ndimage.binary_erosion(above, iterations=1)
    rgb[edge] = (1.0, 0.0, 0.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)
