"""The in-process inspector and the Serve path's plan/finish steps give the same map and summary."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SMALL_CONFIG

from trainer.pipeline import untrained_model
from trainer.scoring import PatchModel, score_in_batches
from trainer.synthetic import DefectKind, synth_image
from workers.inspection import LocalInspector, finish_inspection, plan_inspection


def _model() -> PatchModel:
    calibration = [synth_image(seed, 96)[0] for seed in range(2)]
    card, state = untrained_model(SMALL_CONFIG, calibration, "metal")
    return PatchModel.from_state(card, state, device="cpu")


def test_local_inspector_matches_the_sharded_serve_steps() -> None:
    model = _model()
    image = synth_image(7, 96, (DefectKind.SCRATCH,))[0].astype(np.float32) / 255
    local = LocalInspector(model, chunk_patches=16)(image)
    plan = plan_inspection(image, model.card, chunk_patches=5)  # other chunking: same result
    sharded = finish_inspection(plan, plan.bands([model.score_patches(c) for c in plan.chunks]), model.card)
    np.testing.assert_allclose(local.anomaly_map, sharded.anomaly_map, rtol=1e-5, atol=1e-6)
    assert local.summary.raw_image_score == sharded.summary.raw_image_score
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
