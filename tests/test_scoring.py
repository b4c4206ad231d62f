"""Scoring with a model version: patch residuals, whole-image anomaly maps, smoothing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from schemas import AbnormalPatchSource, ModelCard, ScoreMode, Thresholds
from schemas.model_card import MapMode
from trainer.model_io import weights_to_bytes
from trainer.networks import DiscriminatorHead, build_networks
from trainer.patch_filters import ssim_dissimilarity
from trainer.scoring import LatentOptions, PatchModel, anomaly_map, finish_card_map, finish_map, stitched_map


def _card(
    patch: int = 32,
    stride: int = 16,
    score_mode: ScoreMode = ScoreMode.ENCODER,
    map_mode: MapMode = MapMode.RESIDUAL,
    head: DiscriminatorHead = DiscriminatorHead.GLOBAL,
    contrast_gain: float = 0.0,
) -> ModelCard:
    return ModelCard(
        name="metal",
        version="v-test",
        patch_size=patch,
        stride=stride,
        latent_dim=8,
        base_channels=4,
        gamma=1.0,
        abnormal_patch_source=AbnormalPatchSource.NONE,
        score_mode=score_mode,
        map_mode=map_mode,
        smoothing_sigma=1.5,
        data_digest="test",
        n_train_images=1,
        n_abnormal_images=0,
        train_config={"discriminator_head": str(head), "contrast_gain": contrast_gain},
        thresholds=Thresholds(pixel=0.1, image=0.2, pixel_quantile=0.999, image_quantile=0.99, n_calibration_images=1),
    )


def _weights(patch: int = 32, head: DiscriminatorHead = DiscriminatorHead.GLOBAL) -> bytes:
    torch.manual_seed(0)
    g, d, e = build_networks(patch, 8, 4, discriminator_head=head)
    state = {}
    for prefix, net in (("generator", g), ("discriminator", d), ("encoder", e)):
        state |= {f"{prefix}.{k}": v for k, v in net.state_dict().items()}
    return weights_to_bytes(state)


@pytest.fixture(scope="module")
def model() -> PatchModel:
    return PatchModel.from_safetensors(_card(), _weights(), device="cpu")


def test_score_patches_gives_a_non_negative_map_per_patch(model: PatchModel) -> None:
    patches = np.random.default_rng(0).random((5, 32, 32), dtype=np.float32)
    maps = model.score_patches(patches)
    assert maps.shape == (5, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0  # residuals in [0, 1] intensity units


def test_score_is_the_residual_against_the_reconstruction(model: PatchModel) -> None:
    patches = np.random.default_rng(1).random((3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(model.score_patches(patches), np.abs(patches - model.reconstruct(patches)), atol=1e-6)


def test_scoring_is_deterministic_and_per_patch(model: PatchModel) -> None:
    patches = np.random.default_rng(2).random((4, 32, 32), dtype=np.float32)
    together = model.score_patches(patches)
    alone = np.concatenate([model.score_patches(patches[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-6)  # eval mode: no batch statistics


def test_wrong_patch_shape_is_refused(model: PatchModel) -> None:
    with pytest.raises(ValueError, match=r"\(N, 32, 32\)"):
        model.score_patches(np.zeros((2, 64, 64), dtype=np.float32))


def test_anomaly_map_keeps_an_odd_image_shape(model: PatchModel) -> None:
    image = np.random.default_rng(3).random((100, 77), dtype=np.float32)
    amap = anomaly_map(image, model, batch_size=7)
    assert amap.shape == (100, 77) and amap.dtype == np.float32
    assert np.isfinite(amap).all() and amap.min() >= 0.0


def test_anomaly_map_accepts_uint8_images(model: PatchModel) -> None:
    image = np.random.default_rng(4).integers(0, 256, (40, 50), dtype=np.uint8)
    np.testing.assert_allclose(anomaly_map(image, model), anomaly_map(image.astype(np.float32) / 255, model), atol=1e-6)


def test_finish_map_smooths_without_changing_the_mean() -> None:
    spike = np.zeros((33, 33), dtype=np.float32)
    spike[16, 16] = 1.0
    smooth = finish_map(spike, sigma=2.0)
    assert smooth.shape == spike.shape and smooth.max() < 0.1
    assert abs(smooth.sum() - 1.0) < 1e-3
    np.testing.assert_array_equal(finish_map(spike, 0.0), spike)


def test_search_mode_gives_a_non_negative_map_per_patch() -> None:
    card = _card(score_mode=ScoreMode.SEARCH).model_copy(
        update={"train_config": {"discriminator_head": "global", "search_steps": 5}}
    )
    model = PatchModel.from_safetensors(card, _weights(), device="cpu")
    assert model.discriminator is not None  # L(z) needs f
    assert (model.latent.mode, model.latent.steps) == (ScoreMode.SEARCH, 5)
    patches = np.random.default_rng(7).random((4, 32, 32), dtype=np.float32)
    maps = model.score_patches(patches)
    assert maps.shape == (4, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and (maps >= 0).all()
    np.testing.assert_allclose(maps, np.abs(patches - model.reconstruct(patches)), atol=1e-6)
    np.testing.assert_allclose(maps[:2], model.score_patches(patches[:2]), atol=1e-5)  # one start for every patch


def test_the_same_weights_score_in_either_mode() -> None:
    card, weights = _card(), _weights()
    encoder = PatchModel.from_safetensors(card, weights, device="cpu")
    search = PatchModel.from_safetensors(card, weights, device="cpu", score_mode="search", search_steps=3)
    assert search.latent.mode == ScoreMode.SEARCH and search.latent.steps == 3
    assert search.card == card and encoder.latent.steps == 0
    patches = np.random.default_rng(8).random((3, 32, 32), dtype=np.float32)
    assert not np.allclose(encoder.score_patches(patches), search.score_patches(patches))


def test_search_steps_default_to_anogan_500() -> None:
    assert LatentOptions.for_card(_card(score_mode=ScoreMode.SEARCH)).steps == 500
    assert LatentOptions.for_card(_card()).steps == 0  # encoder mode: no refinement unless asked


def _latent_loss(model: PatchModel, patches: np.ndarray, rec: np.ndarray) -> np.ndarray:
    x, r = (torch.from_numpy(a * 2.0 - 1.0).unsqueeze(1) for a in (patches, rec))
    assert model.discriminator is not None
    with torch.no_grad():
        f_x, f_r = model.discriminator.features(x), model.discriminator.features(r)
    return (0.9 * (x - r).abs().flatten(1).mean(1) + 0.1 * (f_x - f_r).abs().mean(1)).numpy()


def test_refine_steps_do_not_increase_the_search_loss_of_the_encoder_code() -> None:
    card, weights = _card(), _weights()
    plain = PatchModel.from_safetensors(card, weights, device="cpu", with_discriminator=True)
    refined = PatchModel.from_safetensors(card, weights, device="cpu", refine_steps=10)
    assert refined.discriminator is not None and refined.latent.mode == ScoreMode.ENCODER
    patches = np.random.default_rng(9).random((4, 32, 32), dtype=np.float32)
    before = _latent_loss(plain, patches, plain.reconstruct(patches))
    after = _latent_loss(refined, patches, refined.reconstruct(patches))
    assert (after <= before + 1e-6).all() and (after < before).any()


def test_a_search_without_the_discriminator_is_refused() -> None:
    g, d, e = build_networks(32, 8, 4)
    with pytest.raises(ValueError, match="needs the discriminator"):
        PatchModel(_card(score_mode=ScoreMode.SEARCH), g, e, device="cpu")
    with pytest.raises(ValueError, match="needs the discriminator"):
        PatchModel(_card(), g, e, device="cpu", refine_steps=2)
    assert PatchModel(_card(), g, e, d, device="cpu", refine_steps=2).latent.steps == 2


@pytest.mark.parametrize(
    ("overrides", "train_config", "match"),
    [
        ({"score_mode": "search", "search_steps": -1}, {}, "steps must be an integer >= 0"),
        ({"refine_steps": -3}, {}, "steps must be an integer >= 0"),
        ({"score_mode": "search"}, {"search_lambda": 1.5}, r"lambda must be in \[0, 1\]"),
        ({"score_mode": "search"}, {"search_steps": "many"}, "search_steps must be a number"),
        ({"score_mode": "sideways"}, {}, "unknown score mode"),
    ],
)
def test_bad_search_settings_are_refused(overrides: dict, train_config: dict, match: str) -> None:
    card = _card().model_copy(update={"train_config": {"discriminator_head": "global", **train_config}})
    with pytest.raises(ValueError, match=match):
        PatchModel.from_safetensors(card, _weights(), device="cpu", **overrides)


def test_weights_of_another_architecture_are_refused() -> None:
    with pytest.raises(ValueError, match="do not match model card"):
        PatchModel.from_safetensors(_card(patch=64, stride=32), _weights(patch=32), device="cpu")


def test_read_only_patches_are_scored_without_warnings(model: PatchModel) -> None:
    patches = np.random.default_rng(5).random((2, 32, 32), dtype=np.float32)
    patches.flags.writeable = False  # as handed out by the Ray object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.score_patches(patches).shape == (2, 32, 32)


@pytest.mark.parametrize("mode", list(MapMode))
def test_every_map_mode_gives_a_non_negative_map_per_patch_but_the_signed_one(mode: MapMode) -> None:
    head = DiscriminatorHead.DENSE
    model = PatchModel.from_safetensors(_card(map_mode=mode, head=head), _weights(head=head), device="cpu")
    patches = np.random.default_rng(3).random((5, 32, 32), dtype=np.float32)
    maps = model.score_patches(patches)
    assert maps.shape == (5, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and (maps >= 0).all() != mode.signed
    np.testing.assert_allclose(maps[:2], model.score_patches(patches[:2]), atol=1e-6)  # per patch


def test_modes_that_need_the_discriminator_load_it_from_the_card() -> None:
    head = DiscriminatorHead.DENSE
    model = PatchModel.from_safetensors(_card(map_mode=MapMode.LOGIT, head=head), _weights(head=head), device="cpu")
    assert model.discriminator is not None
    assert PatchModel.from_safetensors(_card(), _weights(), device="cpu").discriminator is None


def test_residual_logit_is_the_product_of_residual_and_logit_maps() -> None:
    head, weights = DiscriminatorHead.DENSE, _weights(head=DiscriminatorHead.DENSE)
    patches = np.random.default_rng(4).random((3, 32, 32), dtype=np.float32)
    maps = {
        mode: PatchModel.from_safetensors(_card(map_mode=mode, head=head), weights, device="cpu").score_patches(patches)
        for mode in (MapMode.RESIDUAL, MapMode.LOGIT, MapMode.RESIDUAL_LOGIT)
    }
    np.testing.assert_allclose(maps[MapMode.RESIDUAL_LOGIT], maps[MapMode.RESIDUAL] * maps[MapMode.LOGIT], rtol=1e-5)


def test_signed_residual_is_the_residual_before_its_magnitude() -> None:
    weights, patches = _weights(), np.random.default_rng(6).random((3, 32, 32), dtype=np.float32)
    signed = PatchModel.from_safetensors(_card(map_mode=MapMode.SIGNED_RESIDUAL), weights, device="cpu")
    plain = PatchModel.from_safetensors(_card(), weights, device="cpu")
    np.testing.assert_allclose(np.abs(signed.score_patches(patches)), plain.score_patches(patches), rtol=1e-6)
    np.testing.assert_allclose(signed.score_patches(patches), patches - signed.reconstruct(patches), atol=1e-5)


def test_signed_maps_are_finished_as_magnitudes() -> None:
    weights, image = _weights(), np.random.default_rng(7).random((64, 80), dtype=np.float32)
    model = PatchModel.from_safetensors(_card(map_mode=MapMode.SIGNED_RESIDUAL), weights, device="cpu")
    amap = anomaly_map(image, model)
    assert amap.shape == (64, 80) and (amap >= 0).all()
    card = model.card
    expected = finish_map(stitched_map(image, model), card.smoothing_sigma, card.line_length, signed=True)
    np.testing.assert_allclose(amap, expected, rtol=1e-6)
    lined = card.model_copy(update={"line_length": 15, "smoothing_sigma": 0.7})
    shaped = lined.model_copy(update={"short_segment_weight": 0.6, "blob_radius": 3})
    stitched = stitched_map(image, model)
    with_shapes, without = finish_card_map(stitched, shaped), finish_card_map(stitched, lined)
    assert (with_shapes >= without - 1e-6).all() and (with_shapes > without + 1e-6).any()  # a max over more shapes


def test_smooth_residual_cancels_pixel_noise() -> None:
    smooth = PatchModel.from_safetensors(_card(map_mode=MapMode.SMOOTH_RESIDUAL), _weights(), device="cpu")
    plain = PatchModel.from_safetensors(_card(), _weights(), device="cpu")
    noise = np.random.default_rng(0).random((4, 32, 32), dtype=np.float32)  # white: averages out under σ = 1.5
    assert smooth.score_patches(noise).mean() < 0.5 * plain.score_patches(noise).mean()


def test_a_card_without_map_mode_scores_the_residual() -> None:
    raw = _card().model_dump(mode="json")
    raw.pop("map_mode")
    assert ModelCard.model_validate(raw).map_mode == MapMode.RESIDUAL


@pytest.mark.parametrize("shapes", [{"short_segment_weight": 0.6}, {"blob_radius": 3}])
def test_a_card_with_filter_shapes_but_no_line_filter_is_refused(shapes: dict) -> None:
    raw = _card().model_dump(mode="json") | shapes
    with pytest.raises(ValueError, match="parts of the line filter"):
        ModelCard.model_validate(raw)
    assert ModelCard.model_validate(raw | {"line_length": 15}).line_length == 15


def test_with_a_contrast_gain_the_score_is_still_the_residual_in_intensity_units() -> None:
    model = PatchModel.from_safetensors(_card(contrast_gain=8.0), _weights(), device="cpu")
    patches = np.random.default_rng(6).random((3, 32, 32), dtype=np.float32) * 0.1 + 0.45
    rec = model.reconstruct(patches)
    np.testing.assert_allclose(model.score_patches(patches), np.abs(patches - rec), atol=1e-5)
    # tanh output / gain + the patch mean
    np.testing.assert_allclose(rec.mean((1, 2)), patches.mean((1, 2)), atol=1.0 / 8)


def test_ssim_residual_is_the_residual_weighted_by_structural_dissimilarity() -> None:
    weights = _weights()
    patches = np.random.default_rng(8).random((3, 32, 32), dtype=np.float32)
    ssim_residual = PatchModel.from_safetensors(_card(map_mode=MapMode.SSIM_RESIDUAL), weights, device="cpu")
    residual = PatchModel.from_safetensors(_card(), weights, device="cpu").score_patches(patches)
    rec = ssim_residual.reconstruct(patches)
    dissimilar = ssim_dissimilarity(torch.from_numpy(patches)[:, None], torch.from_numpy(rec)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(ssim_residual.score_patches(patches), residual * dissimilar, rtol=1e-4, atol=1e-6)
