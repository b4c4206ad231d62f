"""Upload a method.md §7 dataset folder as a line's training and frozen validation data (`workers.retrain_data`).

    ROOT/train/good/*                        -> datasets/<line>/train/good/<stem>.png
    ROOT/test/good/*                         -> datasets/<line>/validation/good/<stem>.png
    ROOT/test/<defect>/*                     -> datasets/<line>/validation/<defect>/<stem>.png
    ROOT/ground_truth/<defect>/<stem>_mask.* -> datasets/<line>/validation/<defect>/<stem>_mask.png (0/255)

Every image is decoded (any format `trainer.imaging` reads, 8 or 16 bit, grey or colour) and stored as
a lossless PNG of the levels the trainer uses (`integer_levels`): 8-bit for 8-bit greyscale, 16-bit for
16-bit data and the luminance of colour images. Example::

    summary = upload_dataset_folder(store, Path("metal"), "press-2")
    summary.to_json()    # {"train_good": 24, "validation": {"good": 8, "scratch": 8}, "masks": 8, ...}
    upload_dataset_folder(store, Path("metal"), "press-2")                 # DatasetError: ... --replace
    upload_dataset_folder(store, Path("metal"), "press-2", replace=True)   # writes, removes stale objects

Everything is read and checked before anything is written: a missing ``train/good`` or ``test/good``,
a file name that cannot be a key, two files with the same stem, or a mask whose size differs from its
image's is a `DatasetError` naming the file. Corrupt images are skipped and listed in ``skipped``.
``train/abnormal`` and ``calibration/good`` are not uploaded (listed in ``not_uploaded``): confirmed
abnormal images come through ``anomap confirm``, and ``validation/good`` holds the held-out normals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.folder_dataset import GOOD, DatasetError, image_files
from trainer.imaging import ImageRejected, decode_image, encode_png, integer_levels, read_image_file
from trainer.store import ObjectStore
from workers.retrain_data import MASK_SUFFIX, line_prefix

_STEM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]{0,127}$")
_LABEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]{0,63}$")


@dataclass
class UploadSummary:
    """What `upload_dataset_folder` wrote: counts per folder, objects removed, files skipped and why."""

    line: str
    train_good: int = 0
    validation: dict[str, int] = field(default_factory=dict)
    masks: int = 0
    removed: int = 0
    skipped: list[str] = field(default_factory=list)
    not_uploaded: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """For ``--json`` and logs."""
        return {
            "line": self.line,
            "train_good": self.train_good,
            "validation": dict(self.validation),
            "masks": self.masks,
            "removed": self.removed,
            "skipped": list(self.skipped),
            "not_uploaded": list(self.not_uploaded),
        }


def _stem(path: Path) -> str:
    if not _STEM.fullmatch(path.stem):
        msg = f"{path}: file name {path.stem!r} cannot be an object key; use letters, digits and _ . = - only"
        raise DatasetError(msg)
    return path.stem


def _folder_images(folder: Path, skipped: list[str], is_validation: bool) -> dict[str, bytes]:
    """``{stem: PNG bytes}`` of the readable images of ``folder``; corrupt ones go to ``skipped``."""
    out: dict[str, bytes] = {}
    origin: dict[str, Path] = {}
    for path in image_files(folder):
        stem = _stem(path)
        if is_validation and stem.endswith(MASK_SUFFIX):
            msg = f"{path}: a validation image's name may not end in {MASK_SUFFIX!r} (masks go in ground_truth/)"
            raise DatasetError(msg)
        if stem in origin:
            msg = f"{path} and {origin[stem]} would both be stored as {stem}.png; rename one"
            raise DatasetError(msg)
        try:
            image = integer_levels(read_image_file(path))
        except ImageRejected as exc:
            skipped.append(f"skipped {path}: {exc.detail.removeprefix(f'{path}: ')} ({exc.reason})")
            continue
        origin[stem] = path
        out[stem] = encode_png(image)
    return out


def _mask_png(root: Path, label: str, stem: str, image_png: bytes) -> bytes | None:
    """The 0/255 PNG of ``ground_truth/<label>/<stem>_mask.*`` (None if absent); its size must be the image's."""
    candidates = [p for p in image_files(root / "ground_truth" / label) if p.stem == f"{stem}{MASK_SUFFIX}"]
    if not candidates:
        return None
    path = min(candidates, key=lambda p: (p.suffix.lower() != ".png", p.name))
    try:
        mask = read_image_file(path) > 0.5 / 255.0
    except ImageRejected as exc:
        msg = f"mask {path} cannot be read: {exc.detail}"
        raise DatasetError(msg) from exc
    image = decode_image(image_png)
    if mask.shape != image.shape:
        msg = (
            f"mask {path} is {mask.shape[1]}×{mask.shape[0]} but its image test/{label}/{stem} is "
            f"{image.shape[1]}×{image.shape[0]}; a mask must have its image's size"
        )
        raise DatasetError(msg)
    return encode_png(mask)


def dataset_folder_objects(root: Path, line: str) -> tuple[dict[str, bytes], UploadSummary]:
    """Every object `upload_dataset_folder` would write for ``root`` (validated, nothing written)."""
    root = Path(root)
    base = line_prefix(line)
    if not root.is_dir():
        msg = f"{root} is not a folder; expected ROOT/train/good/*.png and ROOT/test/good/*.png (method.md §7)"
        raise DatasetError(msg)
    summary = UploadSummary(line=line)
    objects: dict[str, bytes] = {}
    train = _folder_images(root / "train" / GOOD, summary.skipped, is_validation=False)
    if not train:
        msg = f"{root / 'train' / GOOD} holds no readable image; the line needs normal training images there"
        raise DatasetError(msg)
    objects |= {f"{base}train/good/{stem}.png": png for stem, png in train.items()}
    summary.train_good = len(train)
    test_root = root / "test"
    labels = []
    if test_root.is_dir():
        labels = sorted(p.name for p in test_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for label in labels:
        if not _LABEL.fullmatch(label):
            msg = f"{test_root / label}: folder name {label!r} cannot be an object key; use letters, digits, _ . = -"
            raise DatasetError(msg)
        images = _folder_images(test_root / label, summary.skipped, is_validation=True)
        for stem, png in images.items():
            objects[f"{base}validation/{label}/{stem}.png"] = png
            if label != GOOD:
                mask = _mask_png(root, label, stem, png)
                if mask is not None:
                    objects[f"{base}validation/{label}/{stem}{MASK_SUFFIX}.png"] = mask
                    summary.masks += 1
        if images:
            summary.validation[label] = len(images)
    if GOOD not in summary.validation:
        msg = (
            f"{test_root / GOOD} holds no readable image; the frozen validation set needs normal images "
            "(thresholds are calibrated on them) and should have test/<defect>/ images with masks"
        )
        raise DatasetError(msg)
    for part in ("train/abnormal", "calibration/good"):
        if image_files(root / part):
            summary.not_uploaded.append(
                f"{root / part}: not uploaded (confirm abnormal images with `anomap confirm`; "
                "validation/good serves as the held-out normals)"
            )
    return objects, summary


def upload_dataset_folder(store: ObjectStore, root: Path, line: str, replace: bool = False) -> UploadSummary:
    """Upload a method.md §7 folder's ``train/good`` and ``test/`` (+ ``ground_truth/``) for ``line``.

    Everything is read and checked before anything is written. A line that already has a training or
    validation set is an error unless ``replace``: then the new objects are written and the old ones
    that the folder does not have are removed (the validation set is frozen: models are compared on it).
    Raises `DatasetError` naming the file and the problem.
    """
    objects, summary = dataset_folder_objects(root, line)
    base = line_prefix(line)
    existing = [k for part in ("train/good/", "validation/") for k in store.list_keys(base + part)]
    if existing and not replace:
        msg = (
            f"{store.ref(base)} already holds {len(existing)} training/validation objects (the validation set is "
            "frozen: models are compared on it); pass --replace to replace them"
        )
        raise DatasetError(msg)
    for key, data in objects.items():
        store.put_bytes(key, data, "image/png")
    for key in existing:
        if key not in objects:
            store.delete(key)
            summary.removed += 1
    return summary
