"""Cutting a patch range and summing its maps in torch (a GPU scorer's path) agrees with `trainer.tiling`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.device_tiling import cut_strip, fold_strip, range_strip, window_on
from trainer.tiling import cut_patches, map_band, pad_image, patch_window, plan_tiles


@pytest.mark.parametrize(("start", "stop"), [(0, 768), (768, 1664), (3456, 4225), (5, 6), (60, 70)])
def test_a_strip_cuts_and_folds_a_range_as_the_host_does(start: int, stop: int) -> None:
    layout = plan_tiles(1024, 1024, 32, 16)  # 65 × 65 patches: ranges start and end inside grid rows
    padded = pad_image(np.random.default_rng(0).random((1024, 1024), dtype=np.float32), layout)
    padded.flags.writeable = False  # as the object store hands it out
    strip = range_strip(32, 16, layout.grid, layout.padded_width, start, stop)
    assert strip is not None
    patches = cut_strip(padded, strip, "cpu")
    np.testing.assert_array_equal(patches[:, 0].numpy(), cut_patches(padded, 32, layout.grid, start, stop))
    maps = torch.rand(stop - start, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    band = fold_strip(maps, strip)
    expected = map_band(maps[:, 0].numpy(), 32, 16, layout.grid, layout.padded_width, start)
    assert (band.top, band.values.shape, band.n_patches) == (expected.top, expected.values.shape, stop - start)
    np.testing.assert_allclose(band.values, expected.values, rtol=1e-6, atol=1e-7)


def test_a_range_on_an_irregular_grid_has_no_strip() -> None:
    layout = plan_tiles(100, 100, 32, 16)  # the last origin is off the stride grid
    assert range_strip(32, 16, layout.grid, layout.padded_width, 0, 3) is None
    assert range_strip(32, 16, layout.grid, layout.padded_width, 0, layout.n_patches) is None


def test_strips_refuse_ranges_and_maps_that_do_not_fit() -> None:
    layout = plan_tiles(64, 64, 32, 16)
    with pytest.raises(ValueError, match="outside the grid"):
        range_strip(32, 16, layout.grid, layout.padded_width, 0, layout.n_patches + 1)
    strip = range_strip(32, 16, layout.grid, layout.padded_width, 0, 4)
    assert strip is not None
    with pytest.raises(ValueError, match="the strip expects"):
        fold_strip(torch.zeros(3, 1, 32, 32), strip)


def test_the_window_is_put_on_the_device_once() -> None:
    window = window_on(32, torch.device("cpu"))
    assert window_on(32, torch.device("cpu")) is window
    assert np.array_equal(window.numpy(), patch_window(32))
