"""The retraining controller's data in the object store: where it lives, how it is loaded, and uploading it.

    datasets/<line>/train/good/<stem>.png                base normal training images (may be noisy)
    datasets/<line>/validation/good/<stem>.png           frozen validation set: normal images, also the
                                                         held-out normals thresholds are calibrated on
                                                         (never trained on)
    datasets/<line>/validation/<defect>/<stem>.png       ... defective images, one folder per kind
    datasets/<line>/validation/<defect>/<stem>_mask.png  ... their masks (0/255), optional
    datasets/<line>/abnormal/<job_id>.png (+ _mask.png)  confirmed abnormal images (`workers.datasets`)
    datasets/<line>/normal/<job_id>.png                  confirmed normal images (false alarms)

``train/good`` and ``validation/`` come from a method.md §7 folder (`workers.dataset_upload`,
``anomap datasets upload DIR --line L``); the confirmed images from `workers.datasets`::

    listing = list_confirmed(store, "press-2")      # ConfirmedListing(abnormal={"cam01-7": True}, normal=[...])
    listing.names                                   # ["abnormal/cam01-7", "normal/cam01-9"]
    data = load_training_data(store, "press-2", listing, min_side=32)   # (H, W) uint8/uint16 images, masks, digest
    validation = load_validation_set(store, "press-2")                  # fits `trainer.evaluation.evaluate`

An object that disappears between listing and loading raises `ObjectMissing` (the run fails and
nothing is promoted); an image that does not decode, or is smaller than a patch, is skipped with a
warning naming its key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from schemas import LINE_PATTERN
from trainer.folder_dataset import GOOD
from trainer.imaging import ImageRejected, decode_image, integer_levels
from trainer.store import ObjectStore

MASK_SUFFIX = "_mask"
"""A mask's stem is its image's stem and this (method.md §7, as in MVTec AD)."""


class RetrainDataError(ValueError):
    """The line's data cannot be used for retraining; the message names the key and what was expected."""


def line_prefix(line: str) -> str:
    """``datasets/<line>/``; raises ValueError for an invalid line id."""
    if not re.fullmatch(LINE_PATTERN, line):
        msg = f"line {line!r} is not a line id: lower-case letters, digits, '_' and '-', at most 32"
        raise ValueError(msg)
    return f"datasets/{line}/"


def _png_stems(store: ObjectStore, prefix: str) -> list[str]:
    """Stems of the ``<stem>.png`` objects directly under ``prefix``, sorted."""
    stems = []
    for key in store.list_keys(prefix):
        leaf = key[len(prefix) :]
        if "/" not in leaf and leaf.endswith(".png"):
            stems.append(leaf[: -len(".png")])
    return sorted(stems)


def _split_masks(stems: list[str]) -> tuple[list[str], set[str]]:
    """Image stems, and those of them with a ``<stem>_mask`` beside them.

    ``x_mask`` is a mask only when ``x`` is there too; otherwise it is an image of its own.
    """
    present = set(stems)
    masks = {s for s in stems if s.endswith(MASK_SUFFIX) and s[: -len(MASK_SUFFIX)] in present}
    images = [s for s in stems if s not in masks]
    return images, {s[: -len(MASK_SUFFIX)] for s in masks}


@dataclass(frozen=True)
class ConfirmedListing:
    """The confirmed images of a line, by name only (no bytes read): job id -> has a mask; normal job ids."""

    abnormal: dict[str, bool] = field(default_factory=dict)
    normal: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """``abnormal/<job_id>`` and ``normal/<job_id>`` of every confirmed image, sorted."""
        return sorted([f"abnormal/{job}" for job in self.abnormal] + [f"normal/{job}" for job in self.normal])

    def digest(self) -> str:
        """sha256 (hex) of `names`: the same set of confirmations gives the same digest."""
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()


def list_confirmed(store: ObjectStore, line: str) -> ConfirmedListing:
    """What ``datasets/<line>/{abnormal,normal}/`` hold now."""
    base = line_prefix(line)
    images, with_mask = _split_masks(_png_stems(store, base + "abnormal/"))
    return ConfirmedListing(
        abnormal={job: job in with_mask for job in images},
        normal=_png_stems(store, base + "normal/"),
    )


class _Reader:
    """Reads PNG objects as (H, W) uint8 or uint16 (`integer_levels`), hashing what it read and collecting warnings."""

    def __init__(self, store: ObjectStore, min_side: int) -> None:
        self.store = store
        self.min_side = min_side
        self.hashed: dict[str, bytes] = {}
        self.warnings: list[str] = []

    def image(self, key: str, *, check_side: bool = True) -> np.ndarray | None:
        data = self.store.get_bytes(key)  # ObjectMissing propagates: the data changed under the run
        try:
            image = integer_levels(decode_image(data))
        except ImageRejected as exc:
            self.warnings.append(f"skipped {self.store.ref(key)}: {exc.detail} ({exc.reason})")
            return None
        if check_side and min(image.shape) < self.min_side:
            side = f"{image.shape[1]}×{image.shape[0]}"
            self.warnings.append(f"skipped {self.store.ref(key)}: {side} is smaller than a {self.min_side} px patch")
            return None
        self.hashed[key] = hashlib.sha256(data).digest()
        return image

    def mask(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        values = self.image(key, check_side=False)
        if values is None:
            return None
        if values.shape != shape:
            self.warnings.append(
                f"ignored mask {self.store.ref(key)}: {values.shape[1]}×{values.shape[0]}, its image is "
                f"{shape[1]}×{shape[0]}"
            )
            del self.hashed[key]
            return None
        return values > 0

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for key in sorted(self.hashed):
            hasher.update(key.encode() + b"\0" + self.hashed[key])
        return hasher.hexdigest()


@dataclass(frozen=True, eq=False)
class RetrainData:
    """What a fine-tune trains on. Images (H, W) uint8 or uint16, masks (H, W) bool or None (unknown: mined).

    ``normal`` is ``train/good`` then the confirmed normal images; ``data_digest`` is the sha256 of
    the keys and bytes of everything loaded (images and masks); ``warnings`` what was skipped.
    """

    normal: list[np.ndarray]
    normal_keys: list[str]
    abnormal: list[np.ndarray]
    abnormal_masks: list[np.ndarray | None]
    abnormal_jobs: list[str]
    data_digest: str
    warnings: list[str]


def load_training_data(store: ObjectStore, line: str, listing: ConfirmedListing, min_side: int) -> RetrainData:
    """Load ``train/good``, the confirmed normal images and the confirmed abnormal ones (with masks) of ``listing``.

    Raises `ObjectMissing` when a listed object is gone, `RetrainDataError` when no normal image is left.
    """
    base = line_prefix(line)
    reader = _Reader(store, min_side)
    normal: list[np.ndarray] = []
    normal_keys: list[str] = []
    keys = [f"{base}train/good/{stem}.png" for stem in _split_masks(_png_stems(store, base + "train/good/"))[0]]
    keys += [f"{base}normal/{job}.png" for job in listing.normal]
    for key in keys:
        image = reader.image(key)
        if image is not None:
            normal.append(image)
            normal_keys.append(key)
    if not normal:
        msg = (
            f"{store.ref(base)} has no usable normal image in train/good/ or normal/; upload the line's "
            f"training images with `anomap datasets upload DIR --line {line}`"
        )
        raise RetrainDataError(msg)
    abnormal: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    jobs: list[str] = []
    for job, has_mask in sorted(listing.abnormal.items()):
        image = reader.image(f"{base}abnormal/{job}.png")
        if image is None:
            continue
        abnormal.append(image)
        masks.append(reader.mask(f"{base}abnormal/{job}{MASK_SUFFIX}.png", image.shape) if has_mask else None)
        jobs.append(job)
    return RetrainData(normal, normal_keys, abnormal, masks, jobs, reader.digest(), reader.warnings)


@dataclass(frozen=True, eq=False)
class ValidationSet:
    """The frozen validation set of a line (a `trainer.evaluation.TestSet`).

    Images (H, W) uint8 or uint16; masks (H, W) bool (all False for ``good``) or None (unknown); labels ``good``
    or the defect kind; ``digest`` the sha256 of the keys and bytes loaded.
    """

    test_images: list[np.ndarray]
    test_masks: list[np.ndarray | None]
    test_labels: list[str]
    test_names: list[str]
    digest: str
    warnings: list[str]

    @property
    def good(self) -> list[np.ndarray]:
        """The normal images: what thresholds are calibrated on."""
        return [image for image, label in zip(self.test_images, self.test_labels, strict=True) if label == GOOD]


def load_validation_set(store: ObjectStore, line: str, min_side: int = 1) -> ValidationSet:
    """Load ``datasets/<line>/validation/``; raises `RetrainDataError` when it holds no normal image."""
    base = line_prefix(line) + "validation/"
    labels = sorted({key[len(base) :].split("/", 1)[0] for key in store.list_keys(base) if "/" in key[len(base) :]})
    labels.sort(key=lambda label: label != GOOD)
    reader = _Reader(store, min_side)
    images: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    names: list[str] = []
    kinds: list[str] = []
    for label in labels:
        stems, with_mask = _split_masks(_png_stems(store, f"{base}{label}/"))
        for stem in stems:
            image = reader.image(f"{base}{label}/{stem}.png")
            if image is None:
                continue
            if label == GOOD:
                mask: np.ndarray | None = np.zeros(image.shape, dtype=bool)
            elif stem in with_mask:
                mask = reader.mask(f"{base}{label}/{stem}{MASK_SUFFIX}.png", image.shape)
            else:
                mask = None
            images.append(image)
            masks.append(mask)
            kinds.append(label)
            names.append(f"{label}/{stem}.png")
    if GOOD not in kinds:
        msg = (
            f"{store.ref(base + GOOD + '/')} holds no usable image: the frozen validation set needs normal images "
            f"(and defect images to compare models on); upload one with `anomap datasets upload DIR --line {line}`"
        )
        raise RetrainDataError(msg)
    return ValidationSet(images, masks, kinds, names, reader.digest(), reader.warnings)
