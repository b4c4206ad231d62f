"""The line filter: kernels, what it keeps (lines at any angle), what it averages away (noise, points)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from trainer.config import TrainConfig
from trainer.line_filter import DIRECTIONS, line_kernels, line_mean_max
from trainer.scoring import finish_map


def _line(size: int, angle_deg: float, width: float = 1.0) -> np.ndarray:
    """A bright straight line of ``width`` px through the centre of a (size, size) zero map, at ``angle_deg``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    angle = math.radians(angle_deg)
    distance = np.abs(-xx * math.sin(angle) + yy * math.cos(angle))
    return np.clip(width / 2 + 0.5 - distance, 0.0, 1.0).astype(np.float32)


def test_kernels_are_means_along_segments_through_the_centre() -> None:
    kernels = line_kernels(15)
    assert kernels.shape == (DIRECTIONS, 15, 15) and kernels.dtype == np.float32
    np.testing.assert_allclose(kernels.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kernels, kernels[:, ::-1, ::-1], atol=1e-6)  # symmetric about the centre
    horizontal, vertical = kernels[0], kernels[DIRECTIONS // 2]
    np.testing.assert_allclose(horizontal[7], 1 / 15, rtol=0.05)  # one row, evenly weighted
    assert horizontal.sum(axis=1)[7] == pytest.approx(1.0)
    np.testing.assert_allclose(vertical, horizontal.T, atol=1e-6)
    assert line_kernels(10).shape[-1] == 11  # an even length gets an odd kernel, so it has a centre


@pytest.mark.parametrize("angle", [0.0, 15.0, 37.5, 45.0, 90.0, 127.0, 172.5])
def test_a_line_keeps_its_height_at_any_angle(angle: float) -> None:
    line = _line(65, angle, width=3.0)  # odd: the centre is a pixel; 3 px: a solid core at any angle
    out = line_mean_max(line, 15)
    centre = out[24:41, 24:41][line[24:41, 24:41] > 0.99]  # on the line, away from its ends
    assert centre.size >= 10
    assert centre.min() > 0.75, f"a line at {angle}° kept only {centre.min():.2f} of its height"


def test_noise_and_points_are_averaged_down() -> None:
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((128, 128)).astype(np.float32)
    assert line_mean_max(noise, 15).std() < 0.5 * noise.std()
    point = np.zeros((31, 31), dtype=np.float32)
    point[15, 15] = 1.0
    assert 1 / 15 - 1e-6 <= line_mean_max(point, 15).max() <= 0.1 + 1e-6  # one segment pixel's share


def test_signed_noise_cancels_where_its_magnitude_does_not() -> None:
    rng = np.random.default_rng(1)
    noise = (0.01 * rng.standard_normal((128, 128))).astype(np.float32)  # a grain's residual: zero-mean
    groove = noise - 0.01 * _line(128, 20.0, width=2.0)  # a dark groove, as deep as the noise σ
    signed, magnitude = line_mean_max(groove, 15, signed=True), line_mean_max(np.abs(groove), 15)
    assert (signed >= 0).all()
    on_line = _line(128, 20.0, width=2.0)[20:108, 20:108] > 0.99
    background = (_line(128, 20.0, width=12.0) == 0)[20:108, 20:108]

    def contrast(m: np.ndarray) -> float:
        inner = m[20:108, 20:108]
        return float((inner[on_line].mean() - inner[background].mean()) / inner[background].std())

    assert contrast(signed) > 2 * contrast(magnitude)  # 3.0 against 1.1 here
    np.testing.assert_array_equal(line_mean_max(-groove, 15, signed=True), signed)  # bright or dark alike
    np.testing.assert_array_equal(line_mean_max(groove, 1, signed=True), np.abs(groove))


def test_a_bright_pixel_at_the_edge_counts_once() -> None:
    edge = np.zeros((40, 40), dtype=np.float32)
    edge[0, 20] = edge[25, 39] = 1.0
    out = line_mean_max(edge, 15)
    assert out.max() <= 0.1 + 1e-6  # as inside the map; repeated across the edge it would be ~8/15


def test_flat_maps_and_length_one_are_unchanged() -> None:
    flat = np.full((20, 30), 0.25, dtype=np.float32)
    np.testing.assert_allclose(line_mean_max(flat, 15), flat, rtol=1e-6)  # borders too
    rng = np.random.default_rng(1)
    values = rng.random((9, 7)).astype(np.float32)
    np.testing.assert_array_equal(line_mean_max(values, 1), values)
    assert line_mean_max(values, 21).shape == values.shape  # a segment longer than the map


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="line length and directions must be >= 1"):
        line_kernels(0)
    with pytest.raises(ValueError, match=r"non-empty \(H, W\) map"):
        line_mean_max(np.zeros((2, 3, 4), dtype=np.float32), 15)
    with pytest.raises(ValueError, match=r"line_length must be between 0 \(off\) and 64 pixels, got 65"):
        TrainConfig(line_length=65)
    with pytest.raises(ValueError, match="smoothing sigma, line length and blob radius must be >= 0"):
        finish_map(np.zeros((8, 8), dtype=np.float32), 0.0, -1)


def test_finish_map_smooths_then_filters() -> None:
    line = _line(48, 30.0)
    smoothed = finish_map(line, 1.0)
    np.testing.assert_allclose(finish_map(line, 1.0, 15), line_mean_max(smoothed, 15), rtol=1e-6)
    np.testing.assert_allclose(finish_map(line, 0.0, 15), line_mean_max(line, 15), rtol=1e-6)
    unchanged = finish_map(line, 0.0, 0)
    np.testing.assert_array_equal(unchanged, line)
    assert unchanged is not line  # a copy: callers may write into it


def test_a_signed_map_is_filtered_to_a_magnitude_then_smoothed() -> None:
    rng = np.random.default_rng(2)
    signed = rng.standard_normal((48, 48)).astype(np.float32)
    lined = line_mean_max(signed, 15, signed=True)
    np.testing.assert_allclose(finish_map(signed, 0.0, 15, signed=True), lined, rtol=1e-6)
    np.testing.assert_allclose(
        finish_map(signed, 0.7, 15, signed=True), gaussian_filter(lined, 0.7, mode="reflect"), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(finish_map(signed, 0.0, 0, signed=True), np.abs(signed))


def test_the_demo_finishes_with_the_filter_and_older_cards_read_as_without() -> None:
    from schemas import AbnormalPatchSource, ModelCard
    from trainer.pipeline import PROVISIONAL_THRESHOLDS, build_card

    card = build_card(TrainConfig.demo(), "m", "v1", AbnormalPatchSource.NONE, PROVISIONAL_THRESHOLDS, "d", 0, 0)
    assert (card.line_length, card.smoothing_sigma, card.map_mode) == (15, 0.7, "signed_residual")
    older = card.model_dump(mode="json")
    for field in ("line_length", "short_segment_weight", "blob_radius"):
        del older[field]  # a version trained before the filter existed had none of its fields
    assert ModelCard.model_validate(older).line_length == 0


@pytest.mark.parametrize(("length", "signed"), [(15, True), (15, False), (8, True), (21, False)])
def test_the_tap_sums_are_the_dense_correlation_with_the_kernels(length: int, signed: bool) -> None:
    import torch
    import torch.nn.functional as F

    values = np.random.default_rng(4).standard_normal((40, 57)).astype(np.float32)
    kernels = torch.from_numpy(line_kernels(length).copy())[:, None]  # (D, 1, K, K)
    pad = kernels.shape[-1] // 2
    padded = F.pad(torch.from_numpy(values)[None, None], (pad,) * 4, mode="reflect")
    means = F.conv2d(padded, kernels)[0]  # the reference: a dense convolution, mirrored borders
    expected = (means.abs() if signed else means).amax(dim=0).numpy()
    np.testing.assert_allclose(line_mean_max(values, length, signed=signed), expected, rtol=1e-5, atol=1e-6)
