"""A user's dataset folder in the MVTec-AD-like layout of method.md §7 (a real MVTec AD copy loads as is).

    ROOT/train/good/*                                   normal training images (required for training)
    ROOT/train/abnormal/*                               optional confirmed abnormal images
    ROOT/ground_truth/train_abnormal/<stem>_mask.png    optional masks for those
    ROOT/calibration/good/*                             optional held-out normal images for thresholds
    ROOT/test/good/*                                    normal test images
    ROOT/test/<defect>/*                                defective test images, one folder per kind
    ROOT/ground_truth/<defect>/<stem>_mask.png          optional masks for those

Example (MVTec AD ``bottle``: 209 train, 83 test images of 900×900 RGB)::

    data = load_dataset(Path("mvtec/bottle"))
    data.train_normal[0].shape, data.train_normal[0].dtype   # (900, 900) uint16 (luminance of RGB)
    len(data.calibration), data.calibration_held_out         # 21, True (10 % of train/good held out)
    data.test_labels[:2], data.test_masks[-1].dtype          # ['broken_large', ...], bool
    data.data_digest                                         # 64 hex digits (sha256)
    load_dataset(Path("empty/"))                             # DatasetError: empty/ has no train/good/ ...

Images may be any size, greyscale or RGB (luminance is used), PNG/JPEG/TIFF/BMP, 8 or 16 bit; all are
decoded by `trainer.imaging` and kept as their integer levels (`integer_levels`): (H, W) uint8 for 8-bit
greyscale, uint16 for 16-bit data and the luminance of colour images, so a model trains on the pixels
it will score. Masks are non-zero where defective. A
corrupt image is skipped with a warning naming it (logged and kept in ``warnings``); a mask whose
size differs from its image is a `DatasetError`; a defective test image without a mask keeps
``None`` as its mask (mask unknown: left out of pixel metrics, still in image metrics).

Without ``calibration/good`` a share (`CALIBRATION_SHARE`, at least one image) of ``train/good``
is held out for the thresholds, chosen by a fixed seed, and never trained on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from trainer.imaging import ImageRejected, integer_levels, read_image_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CALIBRATION_SHARE = 0.1
"""Share of ``train/good`` held out for calibration when there is no ``calibration/good`` folder."""
CALIBRATION_SEED = 0
GOOD = "good"
TRAIN_ABNORMAL_MASKS = "train_abnormal"
_LAYOUT_HINT = "expected ROOT/train/good/*.png (and optionally train/abnormal, calibration/good, test/<kind>)"


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the path and what was expected."""


class DatasetPart(StrEnum):
    """Which part of the folder to load."""

    TRAIN = "train"
    """train/good (required), train/abnormal and calibration/good; test/ is not read."""
    TEST = "test"
    """test/ only (required): for evaluating a trained version."""
    ALL = "all"
    """Both; train/good required, test/ optional."""


@dataclass(frozen=True, eq=False)
class FolderDataset:
    """A loaded dataset folder. Images are (H, W) uint8 or uint16 (`integer_levels`), masks (H, W) bool;
    sizes may differ per image.

    ``abnormal_masks`` and ``test_masks`` hold None where the mask is unknown (``test/good`` images
    get an all-False mask). ``calibration_held_out`` says whether ``calibration`` was taken from
    ``train/good`` (those files are then not in ``train_normal``). ``data_digest`` is the sha256 of
    the relative names and bytes of every file loaded; ``warnings`` lists what was skipped and why.
    """

    root: Path
    part: DatasetPart
    train_normal: list[np.ndarray] = field(default_factory=list)
    train_files: list[Path] = field(default_factory=list)
    abnormal: list[np.ndarray] = field(default_factory=list)
    abnormal_masks: list[np.ndarray | None] = field(default_factory=list)
    abnormal_files: list[Path] = field(default_factory=list)
    calibration: list[np.ndarray] = field(default_factory=list)
    calibration_files: list[Path] = field(default_factory=list)
    calibration_held_out: bool = False
    test_images: list[np.ndarray] = field(default_factory=list)
    test_masks: list[np.ndarray | None] = field(default_factory=list)
    test_labels: list[str] = field(default_factory=list)
    test_files: list[Path] = field(default_factory=list)
    data_digest: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def test_names(self) -> list[str]:
        """``<defect>/<file name>`` of each test image, for reports."""
        return [f"{label}/{path.name}" for label, path in zip(self.test_labels, self.test_files, strict=True)]

    @property
    def min_side(self) -> int:
        """The smallest height or width of any loaded image (0 when none is loaded)."""
        images = [*self.train_normal, *self.abnormal, *self.calibration, *self.test_images]
        return min((min(image.shape) for image in images), default=0)

    def summary(self) -> dict[str, int | bool | str]:
        """Counts for logs and JSON."""
        n_defect = sum(label != GOOD for label in self.test_labels)
        return {
            "train_normal": len(self.train_normal),
            "abnormal": len(self.abnormal),
            "abnormal_with_mask": sum(mask is not None for mask in self.abnormal_masks),
            "calibration": len(self.calibration),
            "calibration_held_out": self.calibration_held_out,
            "test_good": len(self.test_labels) - n_defect,
            "test_defect": n_defect,
            "test_defect_with_mask": sum(
                mask is not None for mask, label in zip(self.test_masks, self.test_labels, strict=True) if label != GOOD
            ),
            "skipped": len(self.warnings),
            "data_digest": self.data_digest,
        }


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (accepted suffixes, any case; hidden files ignored), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


class _Loader:
    """Reads files, collects warnings and hashes what was loaded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.warnings: list[str] = []
        self.hashed: dict[str, bytes] = {}

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def _remember(self, path: Path) -> None:
        self.hashed[path.relative_to(self.root).as_posix()] = hashlib.sha256(path.read_bytes()).digest()

    def image(self, path: Path) -> np.ndarray | None:
        """(H, W) uint8 or uint16 (`integer_levels`), or None (with a warning naming the file) if undecodable."""
        try:
            grey = read_image_file(path)
        except ImageRejected as exc:
            self.warn(f"skipped {path}: {exc.detail.removeprefix(f'{path}: ')} ({exc.reason})")
            return None
        self._remember(path)
        return integer_levels(grey)

    def images(self, folder: Path) -> tuple[list[np.ndarray], list[Path]]:
        loaded, files = [], []
        for path in image_files(folder):
            image = self.image(path)
            if image is not None:
                loaded.append(image)
                files.append(path)
        return loaded, files

    def mask_for(self, image: np.ndarray, image_path: Path, mask_folder: Path) -> np.ndarray | None:
        """The (H, W) bool mask ``<mask_folder>/<stem>_mask.*`` of an image, or None when absent or corrupt."""
        candidates = [p for p in image_files(mask_folder) if p.stem == f"{image_path.stem}_mask"]
        if not candidates:
            return None
        path = min(candidates, key=lambda p: (p.suffix.lower() != ".png", p.name))
        try:
            values = read_image_file(path)
        except ImageRejected as exc:
            self.warn(f"ignored mask {path}: {exc.detail.removeprefix(f'{path}: ')}; mask of {image_path} unknown")
            return None
        if values.shape != image.shape:
            msg = (
                f"mask {path} is {values.shape[1]}×{values.shape[0]} but its image {image_path} is "
                f"{image.shape[1]}×{image.shape[0]}; a mask must have its image's size"
            )
            raise DatasetError(msg)
        self._remember(path)
        marked = values > 0  # any non-black pixel: 0/255 and 16-bit 0/1 masks alike
        if not marked.any():
            self.warn(f"mask {path} marks no pixel: {image_path} counts as a defect image without defect pixels")
        return marked

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for name in sorted(self.hashed):
            hasher.update(name.encode("utf-8", "surrogateescape") + b"\0" + self.hashed[name])  # any file name
        return hasher.hexdigest()


def _split_calibration(
    images: list[np.ndarray], files: list[Path], share: float
) -> tuple[list[np.ndarray], list[Path], list[np.ndarray], list[Path]]:
    """Hold out ``max(1, round(share·n))`` of n training images, chosen by `CALIBRATION_SEED`."""
    n_held = max(1, round(share * len(images)))
    held = set(np.random.default_rng(CALIBRATION_SEED).permutation(len(images))[:n_held].tolist())
    keep = [i for i in range(len(images)) if i not in held]
    out = sorted(held)
    return [images[i] for i in keep], [files[i] for i in keep], [images[i] for i in out], [files[i] for i in out]


def _defect_folders(test_root: Path) -> Iterable[Path]:
    """``test/good`` first, then the defect folders by name."""
    folders = sorted(p for p in test_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(folders, key=lambda p: (p.name != GOOD, p.name))


def _load_train(loader: _Loader, root: Path, calibration_share: float) -> dict[str, object]:
    good = root / "train" / GOOD
    if not good.is_dir():
        msg = f"{root} has no train/good/ folder; {_LAYOUT_HINT}"
        raise DatasetError(msg)
    normal, normal_files = loader.images(good)
    if not normal:
        msg = f"{good} holds no readable image ({', '.join(IMAGE_SUFFIXES)}); {_LAYOUT_HINT}"
        raise DatasetError(msg)
    abnormal, abnormal_files = loader.images(root / "train" / "abnormal")
    mask_folder = root / "ground_truth" / TRAIN_ABNORMAL_MASKS
    masks = [loader.mask_for(image, path, mask_folder) for image, path in zip(abnormal, abnormal_files, strict=True)]
    calibration, calibration_files = loader.images(root / "calibration" / GOOD)
    held_out = not calibration
    if held_out:
        if len(normal) < 2:
            msg = (
                f"{good} has {len(normal)} readable image and there is no {root / 'calibration' / GOOD}/ folder; "
                "need at least 2 images to hold one out for calibration, or a calibration/good/ folder"
            )
            raise DatasetError(msg)
        normal, normal_files, calibration, calibration_files = _split_calibration(
            normal, normal_files, calibration_share
        )
    return {
        "train_normal": normal,
        "train_files": normal_files,
        "abnormal": abnormal,
        "abnormal_masks": masks,
        "abnormal_files": abnormal_files,
        "calibration": calibration,
        "calibration_files": calibration_files,
        "calibration_held_out": held_out,
    }


def _load_test(loader: _Loader, root: Path, required: bool) -> dict[str, object]:
    test_root = root / "test"
    images: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    labels: list[str] = []
    files: list[Path] = []
    if test_root.is_dir():
        for folder in _defect_folders(test_root):
            loaded, paths = loader.images(folder)
            for image, path in zip(loaded, paths, strict=True):
                if folder.name == GOOD:
                    mask: np.ndarray | None = np.zeros(image.shape, dtype=bool)
                else:
                    mask = loader.mask_for(image, path, root / "ground_truth" / folder.name)
                images.append(image)
                masks.append(mask)
                labels.append(folder.name)
                files.append(path)
    if required and not images:
        msg = f"{root} has no readable test image; expected ROOT/test/good/*.png and ROOT/test/<defect>/*.png"
        raise DatasetError(msg)
    return {"test_images": images, "test_masks": masks, "test_labels": labels, "test_files": files}


def _warn_unused_masks(loader: _Loader, root: Path, part: DatasetPart) -> None:
    """Warn about mask files the loaded parts never read: a folder of ``ground_truth/`` that belongs to no image
    folder, and masks whose image is missing or whose name lacks ``_mask`` (their images count as unmasked)."""
    truth = root / "ground_truth"
    if not truth.is_dir():
        return
    image_folders: dict[str, Path] = {}
    if part in (DatasetPart.TRAIN, DatasetPart.ALL):
        image_folders[TRAIN_ABNORMAL_MASKS] = root / "train" / "abnormal"
    test_root = root / "test"
    if part in (DatasetPart.TEST, DatasetPart.ALL) and test_root.is_dir():
        image_folders |= {p.name: p for p in _defect_folders(test_root) if p.name != GOOD}
    for folder in sorted(p for p in truth.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = image_folders.get(folder.name)
        if images is None:
            if part == DatasetPart.ALL:
                loader.warn(
                    f"{folder} is not read: masks of train/abnormal go in ground_truth/{TRAIN_ABNORMAL_MASKS}/, "
                    "those of test/<kind> in ground_truth/<kind>/"
                )
            continue
        stems = {p.stem for p in image_files(images)}
        for mask in image_files(folder):
            if not mask.stem.endswith("_mask"):
                loader.warn(f"{mask} is not used: a mask is named <image stem>_mask.png")
            elif mask.stem.removesuffix("_mask") not in stems:
                loader.warn(f"{mask} is not used: {images} has no image {mask.stem.removesuffix('_mask')}.*")


def load_dataset(
    root: Path, part: DatasetPart = DatasetPart.ALL, calibration_share: float = CALIBRATION_SHARE
) -> FolderDataset:
    """Load the dataset folder ``root`` (layout in the module docstring).

    Raises `DatasetError` when ``root`` is missing or empty, when ``train/good`` is missing or holds no
    readable image (parts TRAIN and ALL), when ``test/`` holds no readable image (part TEST), or when a
    mask's size differs from its image's. Corrupt images are skipped with a warning.
    """
    root = Path(root)
    if not 0.0 < calibration_share < 1.0:
        msg = f"calibration_share must be in (0, 1), got {calibration_share}"
        raise DatasetError(msg)
    if not root.is_dir():
        msg = f"{root} is not a folder; {_LAYOUT_HINT}"
        raise DatasetError(msg)
    if not any(root.iterdir()):
        msg = f"{root} is empty; {_LAYOUT_HINT if part != DatasetPart.TEST else 'expected ROOT/test/<kind>/*.png'}"
        raise DatasetError(msg)
    part = DatasetPart(part)
    loader = _Loader(root)
    fields: dict[str, object] = {}
    if part in (DatasetPart.TRAIN, DatasetPart.ALL):
        fields |= _load_train(loader, root, calibration_share)
    if part in (DatasetPart.TEST, DatasetPart.ALL):
        fields |= _load_test(loader, root, required=part == DatasetPart.TEST)
    _warn_unused_masks(loader, root, part)
    return FolderDataset(
        root=root,
        part=part,
        data_digest=loader.digest(),
        warnings=loader.warnings,
        **fields,  # type: ignore[arg-type]
    )
