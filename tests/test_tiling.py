"""Tiling then stitching an image of any size reproduces it."""

from __future__ import annotations

import gc
import itertools
import tracemalloc

import numpy as np
import pytest

from trainer.tiling import (
    MapBand,
    _overlap_add,
    covers_block_grid,
    cut_patches,
    extract_patches,
    map_band,
    pad_image,
    plan_tiles,
    stitch_bands,
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
    assert covers_block_grid(layout.grid, patch, stride, (layout.padded_height, layout.padded_width))
    values = np.random.default_rng(4).random((layout.n_patches, patch, patch), dtype=np.float32) * 3.3
    loop = np.zeros((layout.padded_height, layout.padded_width), dtype=np.float64)
    for value, (y, x) in zip(values, layout.origins, strict=True):
        loop[y : y + patch, x : x + patch] += value
    np.testing.assert_array_equal(_overlap_add(values, layout), loop)  # bit for bit, not approximately


@pytest.mark.parametrize(
    ("height", "width", "patch", "stride", "cuts"),
    [
        (256, 192, 32, 16, [0, 13, 100, 101, 200]),  # block grid; ranges start and end inside grid rows
        (130, 67, 32, 24, [0, 5, 6, 17]),  # not a block grid: the per-patch loop
        (1024, 1024, 32, 16, [0, 768, 1664, 2560, 3456]),  # the Serve app's five ranges
        (40, 40, 16, 16, [0]),  # one range, no overlap
    ],
)
def test_stitching_the_bands_of_ranges_gives_the_map_of_stitching_their_patches(
    height: int, width: int, patch: int, stride: int, cuts: list[int]
) -> None:
    layout = plan_tiles(height, width, patch, stride)
    maps = np.random.default_rng(3).random((layout.n_patches, patch, patch), dtype=np.float32) * 2.5
    bounds = [*cuts, layout.n_patches]
    bands = [
        map_band(maps[start:stop], patch, stride, layout.grid, layout.padded_width, start)
        for start, stop in itertools.pairwise(bounds)
    ]
    assert all(band.values.dtype == np.float32 and band.values.shape[1] == layout.padded_width for band in bands)
    assert sum(band.values.size for band in bands) < maps.size or len(bands) == 1  # fewer bytes than the maps
    np.testing.assert_allclose(stitch_bands(bands, layout), stitch_patches(maps, layout), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(stitch_bands(bands[::-1], layout), stitch_patches(maps, layout), rtol=2e-6, atol=1e-7)


def test_a_band_covers_only_the_grid_rows_its_range_touches() -> None:
    layout = plan_tiles(256, 256, 32, 16)  # 17 × 17 patches on a 288² padded image
    maps = np.ones((20, 32, 32), dtype=np.float32)
    band = map_band(maps, 32, 16, layout.grid, layout.padded_width, 30)  # patches 30..49: grid rows 1 and 2
    assert band.top == 16 and band.values.shape == (48, 288) and band.n_patches == 20
    # padded rows 16..31 are reached only by grid row 1, where the range holds the last four patches (x >= 208)
    assert band.values[:16, :208].max() == 0 and band.values[:16, 208:].min() > 0
    assert band.values[16:32, :256].min() > 0  # row 2: patches 34..49, all but the last column


def test_stitching_bands_refuses_a_missing_or_misplaced_band() -> None:
    layout = plan_tiles(64, 64, 16, 8)
    maps = np.zeros((layout.n_patches, 16, 16), dtype=np.float32)
    half = layout.n_patches // 2
    bands = [map_band(maps[:half], 16, 8, layout.grid, layout.padded_width, 0)]
    with pytest.raises(ValueError, match="the bands hold"):
        stitch_bands(bands, layout)
    with pytest.raises(ValueError, match="outside the grid"):
        map_band(maps, 16, 8, layout.grid, layout.padded_width, 1)
    with pytest.raises(ValueError, match="expected"):
        map_band(maps[:, :8], 16, 8, layout.grid, layout.padded_width, 0)
    narrow = MapBand(0, np.zeros((layout.padded_height, layout.padded_width - 8), dtype=np.float32), layout.n_patches)
    with pytest.raises(ValueError, match="does not fit"):
        stitch_bands([narrow], layout)


def test_plans_are_cached_and_immutable() -> None:
    layout = plan_tiles(1024, 1024, 32, 16)
    assert plan_tiles(1024, 1024, 32, 16) is layout
    assert layout.grid is layout.grid and len(layout.grid[0]) * len(layout.grid[1]) == layout.n_patches == 4225
    with pytest.raises(AttributeError):
        layout.patch = 64  # type: ignore[misc]


def test_stitching_many_image_sizes_keeps_no_image_sized_weights() -> None:
    """An ingress sees images of many sizes: what stitching caches per size is two vectors, not an
    (Hp, Wp) float64 weight per size (8.9 MB each at 1024², 136 MB at 4096²)."""
    gc.collect()
    tracemalloc.start()
    try:
        for extra in range(4):
            layout = plan_tiles(1024 + extra, 1024, 32, 16)
            stitch_patches(np.ones((layout.n_patches, 32, 32), dtype=np.float32), layout)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert retained < 16e6, retained  # the 4 cached plans (~1 MB each) and their weight vectors
