"""The blob filter and the line filter's other shapes: discs keep spots, half-length segments keep ends."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.blob_filter import disc_kernel, disc_mean
from trainer.config import TrainConfig
from trainer.line_filter import line_mean_max, segment_mean_max, short_segment
from trainer.scoring import finish_map


def _spot(size: int, radius: float, depth: float = 1.0) -> np.ndarray:
    """A dark disc of ``radius`` px and ``depth`` at the centre of a (size, size) zero map (signed: negative)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    return (-depth * np.clip(radius + 0.5 - np.hypot(yy, xx), 0.0, 1.0)).astype(np.float32)


def test_disc_kernels_are_round_means() -> None:
    for radius, pixels in ((1, 5), (2, 13), (3, 29)):
        kernel = disc_kernel(radius)
        assert kernel.shape == (2 * radius + 1,) * 2
        assert (kernel > 0).sum() == pixels
        assert kernel.sum() == pytest.approx(1.0)
        np.testing.assert_array_equal(kernel, kernel.T)
        np.testing.assert_array_equal(kernel, kernel[::-1])
    with pytest.raises(ValueError, match="a disc's radius must be >= 1 pixel, got 0"):
        disc_kernel(0)
    with pytest.raises(ValueError, match=r"expected a non-empty \(H, W\) map, got shape \(3,\)"):
        disc_mean(np.zeros(3), 2)


def test_a_disc_keeps_a_spots_depth_where_a_segment_does_not() -> None:
    spot = _spot(41, radius=3.5)
    lined = line_mean_max(spot, 15, signed=True)
    disc = disc_mean(spot, 3, signed=True)
    assert (disc >= 0).all()
    assert disc[20, 20] == pytest.approx(1.0)  # the whole disc lies inside the spot
    assert lined[20, 20] < 0.6  # a 15 px segment is half off an 8 px spot
    finished = finish_map(spot, 0.0, 15, signed=True, blob_radius=3)
    np.testing.assert_allclose(finished, np.maximum(lined, disc), rtol=1e-6)


def test_half_length_segments_keep_a_groove_whose_residual_comes_and_goes() -> None:
    patchy = np.zeros((41, 81), dtype=np.float32)
    for start in range(8, 72, 16):
        patchy[20, start : start + 7] = -1.0  # 7 px of residual, then 9 px the generator drew back
    lined = line_mean_max(patchy, 15, signed=True)
    both = segment_mean_max(patchy, 15, short_weight=0.6, signed=True)
    assert short_segment(15) == 7 and short_segment(16) == 9 and short_segment(2) == 1
    assert lined[20, 27] == pytest.approx(7 / 15, rel=0.02)  # a 15 px segment averages a stretch with a gap
    assert both[20, 27] == pytest.approx(0.6, rel=0.02)  # a 7 px one lies on the stretch
    solid = np.zeros_like(patchy)
    solid[20, 8:72] = -1.0
    np.testing.assert_array_equal(segment_mean_max(solid, 15, short_weight=0.6, signed=True)[20, 16:64], 1.0)
    np.testing.assert_array_equal(segment_mean_max(patchy, 15, signed=True), lined)  # weight 0: as before
    with pytest.raises(ValueError, match=r"the short segment's weight must be in \[0, 1\], got 1.5"):
        segment_mean_max(patchy, 15, short_weight=1.5)


def test_the_extra_shapes_add_little_to_noise() -> None:
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((256, 256)).astype(np.float32)
    lined = finish_map(noise, 0.7, 15, signed=True)
    shaped = finish_map(noise, 0.7, 15, signed=True, short_segment_weight=0.6, blob_radius=3)
    assert (shaped >= lined - 1e-6).all()
    assert np.percentile(shaped, 99.9) < 1.15 * np.percentile(lined, 99.9)  # the threshold's region


def test_schedules_use_them_and_older_cards_read_as_without() -> None:
    from schemas import AbnormalPatchSource, ModelCard
    from trainer.pipeline import PROVISIONAL_THRESHOLDS, build_card

    card = build_card(TrainConfig.demo(), "m", "v1", AbnormalPatchSource.NONE, PROVISIONAL_THRESHOLDS, "d", 0, 0)
    assert (card.short_segment_weight, card.blob_radius) == (0.6, 3)
    assert (TrainConfig.wide().short_segment_weight, TrainConfig.wide().blob_radius) == (0.6, 3)
    older = card.model_dump(mode="json")
    del older["short_segment_weight"], older["blob_radius"]  # a version trained before them
    assert (ModelCard.model_validate(older).short_segment_weight, ModelCard.model_validate(older).blob_radius) == (
        0.0,
        0,
    )
    assert TrainConfig.demo(line_length=0, short_segment_weight=0.0, blob_radius=0).blob_radius == 0
    with pytest.raises(ValueError, match="they need line_length > 0, or 0 themselves"):
        TrainConfig.demo(line_length=0)


def test_the_short_segments_and_the_disc_are_their_dense_filters() -> None:
    import torch
    import torch.nn.functional as F

    values = np.random.default_rng(5).standard_normal((48, 64)).astype(np.float32)
    both = segment_mean_max(values, 15, short_weight=0.5, signed=True)
    expected = np.maximum(line_mean_max(values, 15, signed=True), 0.5 * line_mean_max(values, 7, signed=True))
    np.testing.assert_allclose(both, expected, rtol=1e-5, atol=1e-6)  # the 7 px points are the 15 px inner ones
    padded = F.pad(torch.from_numpy(values)[None, None], (3,) * 4, mode="reflect")
    dense = F.conv2d(padded, torch.from_numpy(disc_kernel(3).copy())[None, None])[0, 0].abs().numpy()
    np.testing.assert_allclose(disc_mean(values, 3, signed=True), dense, rtol=1e-5, atol=1e-6)
