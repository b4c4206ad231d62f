"""Training patches: random crops, the abnormal-patch bank's three sources, augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from schemas import AbnormalPatchSource
from schemas.model_card import MapMode
from trainer.patches import (
    abnormal_patch_bank,
    augment,
    grid_patches,
    mask_patch_selection,
    patch_contamination,
    sample_patches,
)
from trainer.pipeline import mining_map_mode


def _image(seed: int, h: int = 96, w: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)


def test_sample_patches_are_unit_float_crops_of_the_images() -> None:
    images = [_image(0), _image(1, 64, 64)]
    patches = sample_patches(images, 10, 32, np.random.default_rng(0))
    assert patches.shape == (10, 32, 32) and patches.dtype == np.float32
    assert patches.min() >= 0.0 and patches.max() <= 1.0
    first = (patches[0] * 255).round().astype(np.uint8)
    found = any(
        np.array_equal(img[y : y + 32, x : x + 32], first)
        for img in images
        for y in range(img.shape[0] - 31)
        for x in range(img.shape[1] - 31)
    )
    assert found


def test_sample_patches_is_reproducible_with_a_seed() -> None:
    images = [_image(0)]
    a = sample_patches(images, 5, 32, np.random.default_rng(7))
    b = sample_patches(images, 5, 32, np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_image_smaller_than_a_patch_is_rejected() -> None:
    with pytest.raises(ValueError, match="smaller than one 32×32 patch"):
        sample_patches([_image(0, 20, 80)], 1, 32, np.random.default_rng(0))


def test_grid_patches_cover_the_image_up_to_its_edges() -> None:
    patches, origins = grid_patches(_image(0, 96, 80), 32, 32)
    assert patches.shape == (len(origins), 32, 32)
    assert max(y for y, _ in origins) == 96 - 32 and max(x for _, x in origins) == 80 - 32


def test_masked_image_contributes_only_patches_overlapping_its_mask() -> None:
    image = _image(0, 128, 128)
    mask = np.zeros_like(image, dtype=bool)
    mask[10:12, 10:40] = True  # a short scratch in the top-left corner
    bank, source = abnormal_patch_bank([image], [mask], 32, 16)
    assert source == AbnormalPatchSource.MASK
    all_patches, _ = grid_patches(image, 32, 16)
    assert 0 < len(bank) < len(all_patches)
    assert len(bank) == 3  # origins y=0, x in {0, 16, 32} touch rows 10-11, cols 10-39


def test_mask_selection_counts_each_grid_patchs_mask_pixels() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[40, 40] = True  # one pixel: in the patches at rows and columns 16 and 32 of the 3 × 3 grid
    _, origins = grid_patches(mask.astype(np.uint8), 32, 16)
    keep = mask_patch_selection(mask, 32, 16, min_overlap=1)
    assert keep is not None
    assert [origin for origin, k in zip(origins, keep, strict=True) if k] == [(16, 16), (16, 32), (32, 16), (32, 32)]
    rng = np.random.default_rng(0)
    noisy = rng.random((80, 72)) < 0.02
    counts = [noisy[y : y + 32, x : x + 32].sum() for y, x in grid_patches(noisy.astype(np.uint8), 32, 16)[1]]
    selected = mask_patch_selection(noisy, 32, 16, min_overlap=20)
    assert selected is not None and selected.tolist() == [c >= 20 for c in counts]


def test_no_mask_an_empty_mask_or_one_no_patch_overlaps_enough_selects_nothing() -> None:
    scratch = np.zeros((64, 64), dtype=bool)
    scratch[40, 40] = True
    assert mask_patch_selection(None, 32, 16, 1) is None
    assert mask_patch_selection(np.zeros((64, 64), dtype=bool), 32, 16, 1) is None
    assert mask_patch_selection(scratch, 32, 16, 2) is None  # no patch holds 2 of its 1 pixels


def test_a_mask_no_patch_overlaps_enough_is_mined_not_taken_whole() -> None:
    image = _image(0, 64, 64)
    scratch = np.zeros_like(image, dtype=bool)
    scratch[40, 40] = True
    bank, source = abnormal_patch_bank(
        [image], [scratch], 32, 16, score_fn=lambda p: p.mean(axis=(1, 2)), top_k=2, min_overlap=2
    )
    assert source == AbnormalPatchSource.MINED and len(bank) == 2
    bank, source = abnormal_patch_bank([image], [scratch], 32, 16, min_overlap=1, with_masks=True)
    assert source == AbnormalPatchSource.MASK and len(bank) == 4
    assert bank[:, 1].sum() == 4  # each patch's crop of the mask: its one pixel


def test_unmasked_image_without_scorer_falls_back_to_all_patches() -> None:
    image = _image(0, 64, 64)
    bank, source = abnormal_patch_bank([image], [None], 32, 16)
    assert source == AbnormalPatchSource.ALL
    assert len(bank) == 9


def test_unmasked_image_with_scorer_gives_its_top_patches() -> None:
    image = np.full((96, 96), 100, dtype=np.uint8)
    image[70:72, 60:90] = 255  # one bright scratch, bottom right

    def brightness_score(patches: np.ndarray) -> np.ndarray:  # per-pixel "residual": distance from the surface
        return np.abs(patches - 100 / 255)

    bank, source = abnormal_patch_bank([image], [None], 32, 16, score_fn=brightness_score, top_k=2)
    assert source == AbnormalPatchSource.MINED
    assert len(bank) == 2
    assert all(patch.max() == 1.0 for patch in bank)  # both contain the scratch


@pytest.mark.parametrize(
    ("mode", "mined_by"),
    [
        (MapMode.RESIDUAL, MapMode.RESIDUAL),
        (MapMode.SMOOTH_RESIDUAL, MapMode.SMOOTH_RESIDUAL),
        (MapMode.SSIM_RESIDUAL, MapMode.SSIM_RESIDUAL),  # the demo's map: mined by the map it will be scored by
        (MapMode.FEATURE, MapMode.RESIDUAL),  # the warm-up's discriminator has never seen a defect
        (MapMode.LOGIT, MapMode.RESIDUAL),
        (MapMode.RESIDUAL_LOGIT, MapMode.RESIDUAL),
        (MapMode.SIGNED_RESIDUAL, MapMode.RESIDUAL),  # patches are ranked by their largest values: magnitudes
    ],
)
def test_mining_uses_the_models_map_unless_it_reads_the_discriminator(mode: MapMode, mined_by: MapMode) -> None:
    assert mining_map_mode(str(mode)) is mined_by


def test_mixed_sources_report_the_weakest() -> None:
    image = _image(0, 64, 64)
    mask = np.zeros_like(image, dtype=bool)
    mask[5, 5] = True
    _, source = abnormal_patch_bank([image, image], [mask, None], 32, 32)
    assert source == AbnormalPatchSource.ALL
    _, source = abnormal_patch_bank([image, image], [mask, None], 32, 32, score_fn=lambda p: p.mean(axis=(1, 2)))
    assert source == AbnormalPatchSource.MINED


def test_no_abnormal_images_gives_an_empty_bank() -> None:
    bank, source = abnormal_patch_bank([], [], 32, 16)
    assert bank.shape == (0, 32, 32) and source == AbnormalPatchSource.NONE


def test_bank_rejects_mismatched_masks() -> None:
    with pytest.raises(ValueError, match="masks"):
        abnormal_patch_bank([_image(0)], [], 32, 16)
    with pytest.raises(ValueError, match="mask shape"):
        abnormal_patch_bank([_image(0, 64, 64)], [np.ones((32, 32), dtype=bool)], 32, 16)


def test_augment_keeps_shape_range_and_pixel_multiset_without_jitter() -> None:
    batch = np.random.default_rng(0).random((16, 32, 32), dtype=np.float32)
    out = augment(batch, np.random.default_rng(1), brightness=0.0)
    assert out.shape == batch.shape and out.dtype == np.float32
    for original, turned in zip(batch, out, strict=True):
        assert np.array_equal(np.sort(original.ravel()), np.sort(turned.ravel()))
    assert not np.array_equal(out, batch)


def test_augment_keep_orientation_only_turns_by_180_degrees() -> None:
    stripe = np.zeros((1, 32, 32), dtype=np.float32)
    stripe[0, 8, :] = 1.0  # a horizontal line stays horizontal
    batch = np.repeat(stripe, 32, axis=0)
    out = augment(batch, np.random.default_rng(0), brightness=0.0, keep_orientation=True)
    for patch in out:
        assert np.array_equal(patch.sum(axis=1) > 0, np.isin(np.arange(32), [8, 23]) & (patch.sum(axis=1) > 0))
        assert patch[:, 0].sum() == 1.0  # still one row lit


def test_augment_brightness_stays_in_unit_range() -> None:
    batch = np.ones((8, 32, 32), dtype=np.float32)
    out = augment(batch, np.random.default_rng(0), brightness=0.1)
    assert out.max() <= 1.0 and out.min() >= 0.9


def test_bank_with_masks_carries_each_patch_crop_of_its_mask() -> None:
    image = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[5:7, 40:50] = True
    bank, source = abnormal_patch_bank([image, image], [mask, None], 32, 32, with_masks=True)
    plain, _ = abnormal_patch_bank([image, image], [mask, None], 32, 32)
    assert source == AbnormalPatchSource.ALL and bank.shape == (len(plain), 2, 32, 32)
    np.testing.assert_array_equal(bank[:, 0], plain)
    assert bank[0, 1].sum() == mask.sum() and bank[0, 1, 5, 8] == 1.0  # the one patch over the mask, at (0, 32)
    assert (bank[1:, 1] == 1.0).all()  # no mask: the whole patch is abnormal


def test_augment_turns_masks_with_their_patches_and_shifts_only_the_image() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((6, 16, 16), dtype=np.float32) * 0.5 + 0.25
    stacked = np.stack([image, image], axis=1)  # the "mask" is a copy of the image
    out = augment(stacked, np.random.default_rng(1), brightness=0.05)
    shift = out[:, 0] - out[:, 1]
    assert np.allclose(shift, shift[:, :1, :1], atol=1e-6)  # the same transform, plus a constant per patch
    assert np.abs(shift[:, 0, 0]).max() > 0


def _touching_share_brute_force(mask: np.ndarray, patch: int) -> float:
    h, w = mask.shape
    hits = [mask[y : y + patch, x : x + patch].any() for y in range(h - patch + 1) for x in range(w - patch + 1)]
    return float(np.mean(hits))


def test_patch_contamination_is_the_share_of_crops_touching_a_defect() -> None:
    rng = np.random.default_rng(5)
    masks = [np.zeros((20, 24), dtype=bool), rng.random((20, 24)) > 0.995, np.zeros((20, 24), dtype=bool)]
    masks[2][3, 17] = True  # one pixel: 4 rows (0–3) × 7 columns (10–16) of the 13 × 17 positions for P = 8
    expected = np.mean([_touching_share_brute_force(m, 8) for m in masks])
    assert patch_contamination(masks, 8) == pytest.approx(expected)
    assert _touching_share_brute_force(masks[2], 8) == pytest.approx(4 * 7 / (13 * 17))
    assert patch_contamination([np.zeros((16, 16), dtype=bool)], 8) == 0.0
    assert patch_contamination([np.ones((16, 16), dtype=bool)], 8) == 1.0


def test_patch_contamination_rejects_no_masks_and_masks_smaller_than_a_patch() -> None:
    with pytest.raises(ValueError, match="at least one mask"):
        patch_contamination([], 8)
    with pytest.raises(ValueError, match="smaller than one 8×8 patch"):
        patch_contamination([np.zeros((4, 16), dtype=bool)], 8)
