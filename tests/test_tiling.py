"""Tiling then stitching an image of any size reproduces it."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.tiling import extract_patches, plan_tiles, stitch_patches


@pytest.mark.parametrize(
    ("height", "width", "patch", "stride"),
    [(1024, 1024, 64, 32), (37, 91, 16, 8), (5, 3, 16, 16), (100, 100, 64, 64), (1, 1, 8, 4), (130, 67, 32, 24)],
)
def test_tiling_then_stitching_reproduces_the_image(height: int, width: int, patch: int, stride: int) -> None:
    image = np.random.default_rng(0).random((height, width), dtype=np.float32)
    layout = plan_tiles(height, width, patch, stride)
    patches = extract_patches(image, layout)
    assert patches.shape == (layout.n_patches, patch, patch)
    np.testing.assert_allclose(stitch_patches(patches, layout), image, atol=1e-6)


def test_every_pixel_is_covered_by_the_same_number_of_windows_at_stride_half() -> None:
    layout = plan_tiles(256, 256, 64, 32)
    coverage = np.zeros((layout.padded_height, layout.padded_width))
    for y, x in layout.origins:
        coverage[y : y + 64, x : x + 64] += 1
    inner = coverage[layout.pad : layout.pad + 256, layout.pad : layout.pad + 256]
    assert inner.min() == inner.max() == 4


def test_invalid_plans_name_the_problem() -> None:
    with pytest.raises(ValueError, match="stride"):
        plan_tiles(64, 64, patch=32, stride=64)
    with pytest.raises(ValueError, match="at least 1×1"):
        plan_tiles(0, 64, patch=32, stride=16)
