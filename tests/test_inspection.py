"""The in-process inspector and the Serve path's plan/finish steps give the same map and summary."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SMALL_CONFIG

from trainer.config import TrainConfig
from trainer.pipeline import untrained_model
from trainer.scoring import PatchModel, finish_map, score_in_batches, stitched_map
from trainer.synthetic import DefectKind, synth_image
from workers.inspection import LocalInspector, finish_inspection, inspect_in_ranges, plan_inspection, score_ranges

LINE_FILTERED = SMALL_CONFIG.replace(smoothing_sigma=0.0, line_length=15)
"""The line filter on magnitudes (no Gaussian, 15 px) on the small test model."""
SIGNED = SMALL_CONFIG.replace(map_mode="signed_residual", smoothing_sigma=0.7, line_length=15)
"""Signed residuals, line-filtered, then smoothed, on the small test model."""
SHAPED = SIGNED.replace(short_segment_weight=0.6, blob_radius=3)
"""The demo's maps: as ``SIGNED``, with half-length segments and discs in the filter."""


def _model(config: TrainConfig = SMALL_CONFIG) -> PatchModel:
    calibration = [synth_image(seed, 96)[0] for seed in range(2)]
    card, state = untrained_model(config, calibration, "metal")
    return PatchModel.from_state(card, state, device="cpu")


@pytest.mark.parametrize(
    "config",
    [SMALL_CONFIG, LINE_FILTERED, SIGNED, SHAPED],
    ids=["gaussian", "line-filter", "signed-line-filter", "signed-shapes"],
)
def test_local_inspector_matches_the_sharded_serve_steps(config: TrainConfig) -> None:
    model = _model(config)
    image = synth_image(7, 96, (DefectKind.SCRATCH,))[0].astype(np.float32) / 255
    local = LocalInspector(model, chunk_patches=16)(image)
    plan = plan_inspection(image, model.card, chunk_patches=5)  # other chunking: same result
    sharded = finish_inspection(plan, plan.bands([model.score_patches(c) for c in plan.chunks]), model.card)
    np.testing.assert_allclose(local.anomaly_map, sharded.anomaly_map, rtol=1e-5, atol=1e-6)
    stitched = stitched_map(image, model)  # the library's path: finished as the card says
    expected = finish_map(
        stitched,
        config.smoothing_sigma,
        config.line_length,
        signed=model.card.map_mode.signed,
        short_segment_weight=config.short_segment_weight,
        blob_radius=config.blob_radius,
    )
    np.testing.assert_allclose(local.anomaly_map, expected, rtol=1e-5, atol=1e-6)
    assert (model.card.line_length, str(model.card.map_mode)) == (config.line_length, config.map_mode)
    assert (model.card.short_segment_weight, model.card.blob_radius) == (
        config.short_segment_weight,
        config.blob_radius,
    )
    assert (local.anomaly_map >= 0).all()
    assert local.summary.raw_image_score == pytest.approx(sharded.summary.raw_image_score, rel=1e-5)
    assert local.n_patches == sharded.n_patches == plan.layout.n_patches
    assert local.model_version == model.card.version


def test_pixel_threshold_override_changes_regions_not_the_map() -> None:
    model = _model()
    image = synth_image(3, 96, (DefectKind.SCRATCH,))[0].astype(np.float32) / 255
    default = LocalInspector(model)(image)
    low = LocalInspector(model)(image, pixel_threshold=float(default.anomaly_map.min()) + 1e-6)
    np.testing.assert_array_equal(default.anomaly_map, low.anomaly_map)
    assert low.pixel_threshold < default.pixel_threshold
    assert len(low.summary.regions) >= 1


def test_scoring_the_planned_ranges_with_the_same_batch_gives_the_same_map() -> None:
    model = _model()
    image = synth_image(5, 160, (DefectKind.SCRATCH,))[0].astype(np.float32) / 255
    local = LocalInspector(model, chunk_patches=16)(image)
    plan = plan_inspection(image, model.card, chunk_patches=40, batch_patches=16)
    assert all(r.start % 16 == 0 and 0 < len(r) <= 40 for r in plan.ranges)
    assert sum(len(r) for r in plan.ranges) == plan.layout.n_patches
    patch_maps = [score_in_batches(model, chunk, 16) for chunk in plan.chunks]
    sharded = finish_inspection(plan, plan.bands(patch_maps), model.card)
    # the same forward passes; the bands round each range's sum to float32 once
    np.testing.assert_allclose(local.anomaly_map, sharded.anomaly_map, rtol=2e-6, atol=1e-9)
    assert local.summary.raw_image_score == pytest.approx(sharded.summary.raw_image_score, rel=2e-6)


def test_ranges_are_even_and_never_larger_than_a_chunk() -> None:
    card = _model().card
    image = np.zeros((1024, 1024), dtype=np.float32)  # 4225 patches at P = 32, S = 16
    sizes = [len(r) for r in plan_inspection(image, card, chunk_patches=1024, batch_patches=128).ranges]
    assert sizes == [768, 896, 896, 896, 769]
    assert [len(r) for r in plan_inspection(image, card, chunk_patches=100, batch_patches=128).ranges][:2] == [100, 100]


@pytest.mark.parametrize("size", [160, 100])  # 160²: block strips, cut and folded in torch; 100²: not, on the host
def test_scoring_ranges_on_the_device_gives_the_local_map(size: int) -> None:
    model = _model()
    image = synth_image(6, size, (DefectKind.SCRATCH,))[0].astype(np.float32) / 255
    local = LocalInspector(model, chunk_patches=16)(image)
    plan = plan_inspection(image, model.card, chunk_patches=40, batch_patches=16)
    assert (plan.ranges[0].strip() is not None) == (size == 160)
    bands = score_ranges(model, plan.ranges, [plan.padded] * len(plan.ranges), forward_patches=16)
    sharded = finish_inspection(plan, bands, model.card)
    np.testing.assert_allclose(local.anomaly_map, sharded.anomaly_map, rtol=2e-6, atol=1e-7)


def test_small_ranges_of_several_images_share_forward_passes() -> None:
    model = _model()
    images = [synth_image(seed, 64)[0].astype(np.float32) / 255 for seed in (1, 2)]  # 25 patches each
    plans = [plan_inspection(image, model.card, chunk_patches=1024) for image in images]
    ranges = [plan.ranges[0] for plan in plans]
    calls: list[int] = []
    score = model.score_tensor
    model.score_tensor = lambda unit: calls.append(len(unit)) or score(unit)  # type: ignore[method-assign]
    bands = score_ranges(model, ranges, [plan.padded for plan in plans], forward_patches=64)
    assert calls == [50]  # both images in one forward pass
    for plan, band, image in zip(plans, bands, images, strict=True):
        expected = LocalInspector(_model())(image).anomaly_map
        np.testing.assert_allclose(
            finish_inspection(plan, [band], model.card).anomaly_map, expected, rtol=1e-5, atol=1e-6
        )


def test_the_range_path_a_gpu_inspector_takes_gives_the_host_paths_map() -> None:
    """`LocalInspector` scores in ranges on a GPU (`inspect_in_ranges`) and on the host on a CPU: same maps."""
    model = _model()
    image = synth_image(3, 96, (DefectKind.SCRATCH,))[0]  # uint8: scaled like the host path scales it
    host = LocalInspector(model, chunk_patches=16)(image)
    ranged = inspect_in_ranges(model, image, forward_patches=16)
    np.testing.assert_allclose(ranged.anomaly_map, host.anomaly_map, rtol=1e-5, atol=1e-6)
    assert ranged.summary.raw_image_score == pytest.approx(host.summary.raw_image_score, rel=1e-5)
    assert ranged.n_patches == host.n_patches
