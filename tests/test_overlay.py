"""The overlay blends heat only where the map is at or above threshold and outlines those regions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from trainer.synthetic import synth_image
from workers.overlay import OVERLAY_CONTENT_TYPE, OVERLAY_SUFFIX, encode_overlay, render_overlay


def _blend_every_pixel(image: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """The overlay computed for all pixels at once (alpha 0 below threshold): the reference."""
    grey = np.clip(image, 0.0, 1.0).astype(np.float32)
    heat = np.clip(anomaly_map / threshold - 1.0, 0.0, 1.0)
    above = anomaly_map >= threshold
    alpha = np.where(above, 0.45 + 0.45 * heat, 0.0)[..., None]
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=2)
    rgb = np.repeat(grey[..., None], 3, axis=2) * (1.0 - alpha) + colour * alpha
    rgb[above & ~ndimage.binary_erosion(above)] = (1.0, 0.0, 0.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def test_overlay_blends_only_above_threshold_pixels_exactly_like_blending_every_pixel() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((96, 80)).astype(np.float32) * 1.2 - 0.1  # some values outside [0, 1]
    anomaly_map = ndimage.gaussian_filter(rng.random((96, 80)).astype(np.float32), 2)
    for quantile in (0.0, 0.5, 0.99):
        threshold = float(np.quantile(anomaly_map, quantile))
        overlay = render_overlay(image, anomaly_map, threshold)
        assert overlay.dtype == np.uint8 and overlay.shape == (96, 80, 3)
        np.testing.assert_array_equal(overlay, _blend_every_pixel(image, anomaly_map, threshold))


@pytest.mark.parametrize(
    "blobs",
    [
        [(40, 50, 30, 45)],  # one region well inside: outlines drawn within its bounding box
        [(0, 6, 0, 9), (90, 96, 70, 80)],  # regions in opposite corners, touching the image's edges
        [(0, 96, 39, 41)],  # a band from the top edge to the bottom one
    ],
)
def test_localised_regions_are_blended_and_outlined_like_the_reference(blobs: list[tuple[int, int, int, int]]) -> None:
    rng = np.random.default_rng(1)
    image = rng.random((96, 80)).astype(np.float32)
    anomaly_map = rng.random((96, 80)).astype(np.float32) * 0.5
    for y0, y1, x0, x1 in blobs:
        anomaly_map[y0:y1, x0:x1] += 1.0
    overlay = render_overlay(image, anomaly_map, 1.0)
    np.testing.assert_array_equal(overlay, _blend_every_pixel(image, anomaly_map, 1.0))


def test_a_quiet_map_leaves_the_image_grey() -> None:
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    overlay = render_overlay(image, np.zeros((8, 8), dtype=np.float32), pixel_threshold=0.5)
    assert (overlay[..., 0] == overlay[..., 1]).all() and (overlay[..., 1] == overlay[..., 2]).all()
    np.testing.assert_array_equal(overlay[..., 0], (image * 255 + 0.5).astype(np.uint8))


def test_encoded_overlay_is_a_jpeg_that_keeps_the_picture_and_the_red_outlines() -> None:
    image = synth_image(3, 128)[0].astype(np.float32) / 255.0  # brushed metal, what the cameras see
    anomaly_map = np.zeros((128, 128), dtype=np.float32)
    anomaly_map[40:60, 30:100] = 1.0  # one region: heat inside, a one-pixel red outline around it
    overlay = render_overlay(image, anomaly_map, pixel_threshold=0.5)
    data = encode_overlay(overlay)
    assert data.startswith(b"\xff\xd8\xff") and OVERLAY_SUFFIX == ".jpg" and OVERLAY_CONTENT_TYPE == "image/jpeg"
    assert encode_overlay(overlay) == data  # deterministic: a redelivered job rewrites the same bytes
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert back.shape == overlay.shape
    assert np.abs(back - overlay).mean() < 3.0  # of 255: a picture for people, the .npz map is the record
    outline = (overlay == (255, 0, 0)).all(axis=2)
    assert outline.sum() > 100
    red, green = back[outline][:, 0], back[outline][:, 1]
    assert red.mean() > 200 and green.mean() < 80  # 4:4:4 chroma: one-pixel outlines stay red


def test_encode_overlay_rejects_what_is_not_an_rgb_uint8_picture() -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        encode_overlay(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="dtype float32"):
        encode_overlay(np.zeros((8, 8, 3), dtype=np.float32))
