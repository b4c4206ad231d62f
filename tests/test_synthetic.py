"""The synthetic brushed-metal generator: exact, reproducible, masks where the defects are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from trainer.imaging import decode_image
from trainer.synthetic import DefectKind, make_dataset, synth_image, write_dataset_folder

SIZE = 128


def test_same_seed_gives_identical_bytes() -> None:
    a, mask_a = synth_image(5, SIZE, [DefectKind.SCRATCH, DefectKind.SPOT])
    b, mask_b = synth_image(5, SIZE, [DefectKind.SCRATCH, DefectKind.SPOT])
    assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(mask_a, mask_b)
    assert synth_image(6, SIZE)[0].tobytes() != synth_image(5, SIZE)[0].tobytes()


def test_image_is_uint8_mid_grey_with_texture_and_normal_mask_is_empty() -> None:
    image, mask = synth_image(0, SIZE)
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE)
    assert mask.dtype == np.bool_ and not mask.any()
    assert 60 < image.mean() < 190
    assert image.std() > 2.0
    assert image.min() > 0 and image.max() < 255  # no clipping


def test_brushing_is_anisotropic() -> None:
    image = synth_image(1, 256)[0].astype(np.float64)
    along = np.abs(np.diff(image, axis=1)).mean()  # along the brushing (x)
    across = np.abs(np.diff(image, axis=0)).mean()
    assert across > 1.5 * along


@pytest.mark.parametrize("kind", list(DefectKind))
def test_defect_mask_covers_what_was_drawn(kind: DefectKind) -> None:
    clean, clean_mask = synth_image(11, SIZE)
    image, mask = synth_image(11, SIZE, [kind])
    assert not clean_mask.any()
    assert mask.any()
    diff = np.abs(image.astype(np.int16) - clean.astype(np.int16))
    # the surface and sensor noise are the same for the same seed: defects are the only change
    assert diff[mask].mean() >= 2.0
    near = ndimage.binary_dilation(mask, iterations=3)
    assert diff[~near].max() <= 1  # rounding at most, away from the defects
    labels, n = ndimage.label(mask, np.ones((3, 3)))
    for region in range(1, n + 1):
        assert diff[labels == region].max() >= 2  # every masked region was visibly drawn


def test_scratches_are_dark_or_bright_and_subtle() -> None:
    changes = []
    for seed in range(12):
        clean = synth_image(seed, 256)[0].astype(np.float64)
        image, mask = synth_image(seed, 256, [DefectKind.SCRATCH])
        changes.append(np.median((image - clean)[mask] / clean[mask]))
    changes = np.array(changes)
    assert (changes < 0).sum() > (changes > 0).sum()  # mostly dark grooves
    assert np.all(np.abs(changes) < 0.15)  # 3–12 % deep, never a black line


def test_seed_must_be_non_negative_and_size_sensible() -> None:
    with pytest.raises(ValueError, match="seed"):
        synth_image(-1, SIZE)
    with pytest.raises(ValueError, match="size"):
        synth_image(0, 16)


def _small_dataset(seed: int = 3) -> object:
    return make_dataset(
        size=SIZE,
        n_train=10,
        contamination=0.2,
        n_abnormal=2,
        n_calibration=2,
        n_test_normal=2,
        n_test_defect=3,
        seed=seed,
        kinds=(DefectKind.SCRATCH, DefectKind.STAIN),
    )


def test_dataset_contamination_and_masks() -> None:
    data = _small_dataset()
    assert len(data.train_normal) == 10
    assert sum(data.train_contaminated) == 2
    for contaminated, mask in zip(data.train_contaminated, data.train_masks, strict=True):
        assert mask.any() == contaminated
    assert all(m.any() for m in data.abnormal_masks)
    assert data.abnormal_kinds == [DefectKind.SCRATCH, DefectKind.STAIN]
    assert len(data.calibration) == 2
    assert data.test_labels == ["good", "good", "scratch", "stain", "scratch"]
    assert [m.any() for m in data.test_masks] == [False, False, True, True, True]
    every = data.train_normal + data.abnormal + data.calibration + data.test_images
    assert len({image.tobytes() for image in every}) == len(every)  # each image has its own seed


def test_dataset_is_deterministic_and_digest_follows_parameters() -> None:
    a, b = _small_dataset(), _small_dataset()
    assert a.digest() == b.digest() and len(a.digest()) == 16
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a.test_images, b.test_images, strict=True))
    assert _small_dataset(seed=4).digest() != a.digest()


def test_contamination_density_adds_defects_to_the_contaminated_images_only() -> None:
    sparse = make_dataset(size=SIZE, n_train=6, contamination=0.5, n_abnormal=1, n_test_normal=1, n_test_defect=1)
    dense = make_dataset(
        size=SIZE, n_train=6, contamination=0.5, n_abnormal=1, n_test_normal=1, n_test_defect=1, contamination_density=6
    )
    assert dense.train_contaminated == sparse.train_contaminated
    for dirty, a, b, mask_a, mask_b in zip(
        sparse.train_contaminated,
        sparse.train_normal,
        dense.train_normal,
        sparse.train_masks,
        dense.train_masks,
        strict=True,
    ):
        if dirty:
            assert mask_b.sum() > mask_a.sum()
        else:
            np.testing.assert_array_equal(a, b)
    same = zip(sparse.abnormal + sparse.test_images, dense.abnormal + dense.test_images, strict=True)
    assert all(np.array_equal(a, b) for a, b in same)  # only the contaminated training images change
    assert dense.digest() != sparse.digest()
    pinned = make_dataset(
        size=64, n_train=4, contamination=0.5, n_abnormal=1, n_calibration=1, n_test_normal=1, n_test_defect=1, seed=3
    )
    assert pinned.digest() == "a31e18c537d39612"  # the digest from before contamination_density existed
    with pytest.raises(ValueError, match="contamination_density"):
        make_dataset(size=SIZE, contamination_density=0)


def test_contamination_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="contamination"):
        make_dataset(size=SIZE, contamination=1.5)


def test_folder_layout(tmp_path: Path) -> None:
    data = _small_dataset()
    write_dataset_folder(data, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {f"train/good/{i:03d}.png" for i in range(10)} <= names
    assert {"train/abnormal/000.png", "train/abnormal/001.png"} <= names
    assert {"ground_truth/train_abnormal/000_mask.png", "ground_truth/train_abnormal/001_mask.png"} <= names
    assert {"test/good/000.png", "test/good/001.png", "test/scratch/000.png", "test/scratch/001.png"} <= names
    assert {"test/stain/000.png", "ground_truth/scratch/001_mask.png", "ground_truth/stain/000_mask.png"} <= names
    assert not any(n.startswith("ground_truth/good") for n in names)
    assert {"calibration/good/000.png", "synthetic.json"} <= names
    image = decode_image((tmp_path / "test/scratch/001.png").read_bytes())
    np.testing.assert_array_equal(np.rint(image * 255).astype(np.uint8), data.test_images[4])
    mask = decode_image((tmp_path / "ground_truth/scratch/001_mask.png").read_bytes())
    np.testing.assert_array_equal(mask > 0.5, data.test_masks[4])
    info = json.loads((tmp_path / "synthetic.json").read_text())
    assert info["digest"] == data.digest()
    assert len(info["contaminated_train_images"]) == 2
