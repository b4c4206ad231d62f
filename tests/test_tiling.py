"""Tiling then stitching an image of any size reproduces it."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.tiling import (
    _is_block_grid,
    _overlap_add,
    cut_patches,
    extract_patches,
    pad_image,
    plan_tiles,
    stitch_patches,
)


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


@pytest.mark.parametrize(("height", "width", "patch", "stride"), [(256, 256, 32, 16), (130, 67, 32, 24)])
def test_any_range_of_patches_cut_from_the_padded_image_is_that_slice_of_all_patches(
    height: int, width: int, patch: int, stride: int
) -> None:
    image = np.random.default_rng(1).random((height, width), dtype=np.float32)
    layout = plan_tiles(height, width, patch, stride)
    padded = pad_image(image, layout)
    padded.flags.writeable = False  # as Ray's object store hands it to a scorer
    everything = extract_patches(image, layout)
    for start, stop in [(0, layout.n_patches), (0, 1), (5, 23), (layout.n_patches - 7, layout.n_patches)]:
        np.testing.assert_array_equal(cut_patches(padded, patch, layout.grid, start, stop), everything[start:stop])
    with pytest.raises(ValueError, match="outside the grid"):
        cut_patches(padded, patch, layout.grid, 0, layout.n_patches + 1)


@pytest.mark.parametrize(("height", "width", "patch", "stride"), [(256, 256, 32, 16), (130, 67, 32, 24)])
def test_stitching_chunks_of_maps_equals_stitching_them_all_at_once(
    height: int, width: int, patch: int, stride: int
) -> None:
    layout = plan_tiles(height, width, patch, stride)
    maps = np.random.default_rng(2).random((layout.n_patches, patch, patch), dtype=np.float32)
    chunks = np.split(maps, [3, 40, 41])
    np.testing.assert_array_equal(stitch_patches(chunks, layout), stitch_patches(maps, layout))
    with pytest.raises(ValueError, match="layout expects"):
        stitch_patches(chunks[1:], layout)  # the first three missing


@pytest.mark.parametrize(
    ("height", "width", "patch", "stride"), [(256, 192, 32, 16), (64, 96, 32, 8), (48, 48, 16, 16)]
)
def test_block_grid_overlap_add_sums_each_pixel_exactly_as_the_per_patch_loop(
    height: int, width: int, patch: int, stride: int
) -> None:
    layout = plan_tiles(height, width, patch, stride)
    assert _is_block_grid(layout)
    values = np.random.default_rng(4).random((layout.n_patches, patch, patch), dtype=np.float32) * 3.3
    loop = np.zeros((layout.padded_height, layout.padded_width), dtype=np.float64)
    for value, (y, x) in zip(values, layout.origins, strict=True):
        loop[y : y + patch, x : x + patch] += value
    np.testing.assert_array_equal(_overlap_add(values, layout), loop)  # bit for bit, not approximately


def test_plans_are_cached_and_immutable() -> None:
    layout = plan_tiles(1024, 1024, 32, 16)
    assert plan_tiles(1024, 1024, 32, 16) is layout
    assert layout.grid is layout.grid and len(layout.grid[0]) * len(layout.grid[1]) == layout.n_patches == 4225
    with pytest.raises(AttributeError):
        layout.patch = 64  # type: ignore[misc]
