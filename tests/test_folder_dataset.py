"""Dataset folders in the MVTec-like layout: what loads, what is held out, and clear errors for bad input."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.folder_dataset import DatasetError, DatasetPart, load_dataset
from trainer.imaging import decode_image, encode_png
from trainer.patches import as_unit_float
from trainer.synthetic import make_dataset, write_dataset_folder


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metal")
    data = make_dataset(size=64, n_train=6, n_abnormal=2, n_calibration=2, n_test_normal=2, n_test_defect=2, seed=3)
    write_dataset_folder(data, root)
    return root


def _copy(folder: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    return root


def test_synthetic_folder_loads_with_every_part(synthetic_folder: Path) -> None:
    data = load_dataset(synthetic_folder)
    reference = make_dataset(
        size=64, n_train=6, n_abnormal=2, n_calibration=2, n_test_normal=2, n_test_defect=2, seed=3
    )
    assert len(data.train_normal) == 6 and not data.calibration_held_out
    assert all(image.dtype == np.uint8 and image.shape == (64, 64) for image in data.train_normal)
    np.testing.assert_array_equal(data.train_normal[0], reference.train_normal[0])
    assert len(data.abnormal) == 2 and all(mask is not None for mask in data.abnormal_masks)
    np.testing.assert_array_equal(data.abnormal_masks[1], reference.abnormal_masks[1])
    assert len(data.calibration) == 2
    assert data.test_labels == ["good", "good", "scratch", "scratch"]
    assert data.test_names[2] == "scratch/000.png"
    assert not data.test_masks[0].any() and data.test_masks[2].dtype == np.bool_
    np.testing.assert_array_equal(data.test_masks[2], reference.test_masks[2])
    assert len(data.data_digest) == 64 and data.warnings == []


def test_digest_follows_file_bytes(synthetic_folder: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_folder, tmp_path)
    before = load_dataset(root).data_digest
    assert load_dataset(root).data_digest == before
    image = np.array(Image.open(root / "train/good/000.png"))
    image[0, 0] ^= 1
    (root / "train/good/000.png").write_bytes(encode_png(image))
    assert load_dataset(root).data_digest != before


def test_folder_without_abnormal_or_calibration_holds_out_train_images(synthetic_folder: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_folder, tmp_path)
    shutil.rmtree(root / "train/abnormal")
    shutil.rmtree(root / "calibration")
    shutil.rmtree(root / "test")
    data = load_dataset(root)
    assert data.abnormal == [] and data.abnormal_masks == []
    assert data.calibration_held_out and len(data.calibration) == 1  # 10 % of 6, at least one
    assert len(data.train_normal) == 5
    assert not set(data.calibration_files) & set(data.train_files)
    assert data.test_images == []


def test_empty_folder_names_the_path_and_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"is empty; expected ROOT/train/good") as info:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_folder_without_train_good_is_an_error(synthetic_folder: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_folder, tmp_path)
    shutil.rmtree(root / "train/good")
    with pytest.raises(DatasetError, match=r"has no train/good/ folder"):
        load_dataset(root)
    assert len(load_dataset(root, DatasetPart.TEST).test_images) == 4  # evaluation does not need it


def test_corrupt_image_is_skipped_with_a_warning_naming_it(
    synthetic_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(synthetic_folder, tmp_path)
    bad = root / "train/good/002.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    (root / "test/good/zz.jpg").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING, logger="trainer.folder_dataset"):
        data = load_dataset(root)
    assert len(data.train_normal) == 5 and len(data.test_images) == 4
    assert len(data.warnings) == 2
    assert str(bad) in data.warnings[0] and "zz.jpg" in data.warnings[1]
    assert str(bad) in caplog.text


def test_mask_of_another_size_names_both_files(synthetic_folder: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_folder, tmp_path)
    (root / "ground_truth/scratch/001_mask.png").write_bytes(encode_png(np.zeros((32, 48), dtype=bool)))
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    message = str(info.value)
    assert "ground_truth/scratch/001_mask.png is 48×32" in message
    assert "test/scratch/001.png is 64×64" in message


def test_defect_image_without_mask_has_unknown_mask(synthetic_folder: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_folder, tmp_path)
    (root / "ground_truth/scratch/000_mask.png").unlink()
    (root / "ground_truth/train_abnormal/001_mask.png").unlink()
    data = load_dataset(root)
    assert data.test_masks[2] is None and data.test_masks[3] is not None
    assert data.abnormal_masks[0] is not None and data.abnormal_masks[1] is None
    assert data.summary()["test_defect_with_mask"] == 1


def test_a_file_name_that_is_not_utf8_loads_and_counts_in_the_digest(synthetic_folder: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_folder, tmp_path)
    before = load_dataset(root).data_digest
    latin1 = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes from an old share: Python keeps them as a surrogate
    shutil.copy(root / "train/good/000.png", root / "train/good" / latin1)
    data = load_dataset(root)
    assert len(data.train_normal) == 7 and data.data_digest != before


def test_sixteen_bit_zero_one_masks_mark_their_pixels_and_an_empty_mask_is_named(
    synthetic_folder: Path, tmp_path: Path
) -> None:
    root = _copy(synthetic_folder, tmp_path)
    reference = load_dataset(root).test_masks[2]
    assert reference is not None and reference.any()
    mask = Image.fromarray(reference.astype(np.uint16))  # 0/1 in 16 bits: a label tool's mask
    mask.save(root / "ground_truth/scratch/000_mask.png")
    (root / "ground_truth/scratch/001_mask.png").write_bytes(encode_png(np.zeros((64, 64), dtype=np.uint8)))
    data = load_dataset(root)
    np.testing.assert_array_equal(data.test_masks[2], reference)
    assert any("001_mask.png marks no pixel" in warning for warning in data.warnings)


def test_masks_nothing_reads_are_named(synthetic_folder: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_folder, tmp_path)
    (root / "ground_truth/train_abnormal").rename(root / "ground_truth/abnormal")  # the natural guess, not read
    (root / "ground_truth/scratch/007_mask.png").write_bytes(encode_png(np.ones((64, 64), dtype=bool)))
    shutil.copy(root / "ground_truth/scratch/000_mask.png", root / "ground_truth/scratch/000.png")
    data = load_dataset(root)
    assert all(mask is None for mask in data.abnormal_masks)
    assert any("ground_truth/abnormal is not read" in warning for warning in data.warnings)
    assert any("007_mask.png is not used" in warning and "no image 007" in warning for warning in data.warnings)
    assert any("scratch/000.png is not used: a mask is named" in warning for warning in data.warnings)


def test_images_load_as_the_levels_the_scorer_sees(tmp_path: Path) -> None:
    """8-bit grey stays uint8; 16-bit grey and the luminance of colour images are kept as uint16, so the
    trainer's pixels equal what `decode_image` hands the scorers for the same file (to 1/65535)."""
    rng = np.random.default_rng(0)
    good = tmp_path / "train/good"
    good.mkdir(parents=True)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(good / "a.png")
    Image.fromarray(rgb).save(good / "b.bmp")
    grey16 = rng.integers(0, 65536, (40, 56), dtype=np.uint16)
    Image.fromarray(grey16).save(good / "c.tif")
    Image.fromarray(rgb).save(good / "d.jpg", quality=95)
    grey8 = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    Image.fromarray(grey8).save(good / "e.png")
    data = load_dataset(tmp_path, DatasetPart.TRAIN)
    loaded = {path.name: image for path, image in zip(data.train_files, data.train_normal, strict=True)}
    loaded |= {path.name: image for path, image in zip(data.calibration_files, data.calibration, strict=True)}
    assert sorted(loaded) == ["a.png", "b.bmp", "c.tif", "d.jpg", "e.png"]
    assert {name: image.dtype for name, image in loaded.items()} == {
        "a.png": np.uint16,
        "b.bmp": np.uint16,
        "c.tif": np.uint16,
        "d.jpg": np.uint16,
        "e.png": np.uint8,
    }
    assert all(image.shape == (40, 56) for image in loaded.values())
    np.testing.assert_array_equal(loaded["c.tif"], grey16)
    np.testing.assert_array_equal(loaded["e.png"], grey8)
    np.testing.assert_array_equal(loaded["a.png"], loaded["b.bmp"])
    for name, image in loaded.items():  # the trainer's pixels are the scorer's
        scored = decode_image((good / name).read_bytes())
        assert np.abs(as_unit_float(image) - scored).max() <= 0.5 / 65535 + 1e-7, name
    luma = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0
    assert np.abs(as_unit_float(loaded["a.png"]) - luma).max() < 1e-4


def test_single_training_image_without_calibration_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "train/good").mkdir(parents=True)
    (tmp_path / "train/good/0.png").write_bytes(encode_png(np.zeros((16, 16), dtype=np.uint8)))
    with pytest.raises(DatasetError, match=r"need at least 2 images"):
        load_dataset(tmp_path)
