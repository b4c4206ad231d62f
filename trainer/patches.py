"""Training patches: random crops of normal images, the abnormal-patch bank, and augmentation.

Images are (H, W) greyscale, uint8 (0–255) or float in [0, 1]; patches come out float32 in [0, 1].

Example (P = 64)::

    rng = np.random.default_rng(0)
    batch = sample_patches(normal_images, 32, 64, rng)                 # (32, 64, 64)
    bank, source = abnormal_patch_bank(abnormal_images, masks, 64, 32)   # (M, 64, 64), MASK / ALL
    bank, source = abnormal_patch_bank(images, [None] * len(images), 64, 32, score_fn=model_scores)  # MINED
    batch = augment(bank[:16], rng)                                     # flips, 90° turns, brightness

The bank follows method.md §3: (a) patches overlapping a mask, (b) the top-scoring patches under a
warm-up model when there is no mask and a ``score_fn`` is given, (c) every patch as a last resort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from schemas import AbnormalPatchSource

PatchScorer = Callable[[np.ndarray], np.ndarray]
"""(N, P, P) patches in [0, 1] -> (N,) patch scores or (N, P, P) residual maps."""

_TOP_SHARE = 0.02  # a (N, P, P) map is reduced to the mean of its top 2 % pixels: a thin scratch's share


def as_unit_float(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 / uint16 / float image -> float32 in [0, 1]."""
    if image.ndim != 2:
        msg = f"expected a greyscale (H, W) image, got shape {image.shape}"
        raise ValueError(msg)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    msg = f"unsupported image dtype {image.dtype}; expected uint8, uint16 or float in [0, 1]"
    raise ValueError(msg)


def _check_fits(image: np.ndarray, patch: int) -> None:
    if image.ndim != 2 or image.shape[0] < patch or image.shape[1] < patch:
        msg = f"image of shape {image.shape} is smaller than one {patch}×{patch} patch"
        raise ValueError(msg)


def sample_patches(images: Sequence[np.ndarray], n: int, patch: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniformly random P×P crops (image chosen uniformly, then position) -> (n, P, P) float32 in [0, 1]."""
    if not images:
        msg = "sample_patches needs at least one image"
        raise ValueError(msg)
    for image in images:
        _check_fits(image, patch)
    which = rng.integers(0, len(images), size=n)
    out = np.empty((n, patch, patch), dtype=np.float32)
    for i, k in enumerate(which):
        image = images[k]
        y = int(rng.integers(0, image.shape[0] - patch + 1))
        x = int(rng.integers(0, image.shape[1] - patch + 1))
        out[i] = as_unit_float(image[y : y + patch, x : x + patch])
    return out


def patch_contamination(masks: Sequence[np.ndarray], patch: int) -> float:
    """The share of the crops `sample_patches` draws that touch a defect: masks (H, W) bool, one per image.

    Each image is equally likely, then each P×P position inside it (as in `sample_patches`), so this is
    the fraction of the GAN's training samples that carry (part of) a defect: the paper's ε, measured
    on patches. 0.0 for all-False masks.
    """
    if not masks:
        msg = "patch_contamination needs at least one mask"
        raise ValueError(msg)
    shares = []
    for mask in masks:
        _check_fits(mask, patch)
        # summed-area table: the defect pixels inside every P×P window, all windows at once
        table = np.pad(np.asarray(mask, dtype=bool).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        inside = table[patch:, patch:] - table[:-patch, patch:] - table[patch:, :-patch] + table[:-patch, :-patch]
        shares.append(float(np.mean(inside > 0)))
    return float(np.mean(shares))


def _grid(length: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one axis, inside the image (no padding), the last one flush with the edge."""
    last = length - patch
    origins = list(range(0, last + 1, stride))
    if origins[-1] != last:
        origins.append(last)
    return origins


def grid_patches(image: np.ndarray, patch: int, stride: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Every P×P patch on a stride-S grid inside ``image`` -> ((N, P, P) float32 in [0, 1], origins)."""
    _check_fits(image, patch)
    unit = as_unit_float(image)
    origins = [(y, x) for y in _grid(image.shape[0], patch, stride) for x in _grid(image.shape[1], patch, stride)]
    patches = np.stack([unit[y : y + patch, x : x + patch] for y, x in origins])
    return patches, origins


def mask_patch_selection(mask: np.ndarray | None, patch: int, stride: int, min_overlap: int) -> np.ndarray | None:
    """Source (a) for one abnormal image: which of its stride-S grid patches (in `grid_patches` order) hold
    >= ``min_overlap`` mask pixels, (N,) bool; None where (a) cannot serve it (no mask, an empty mask, or a
    mask no grid patch overlaps that much, such as a 1-px scratch with ``min_overlap`` 2), so the image
    needs (b) or (c). `abnormal_patch_bank` and the pipeline's choice of a mining warm-up both ask this.
    """
    if mask is None:
        return None
    hits = np.asarray(mask) > 0
    if not hits.any():
        return None
    _check_fits(hits, patch)
    # summed-area table: the mask pixels inside every grid patch, all at once
    table = np.pad(hits.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys, xs = np.meshgrid(_grid(hits.shape[0], patch, stride), _grid(hits.shape[1], patch, stride), indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()  # row-major, as grid_patches' origins
    counts = table[ys + patch, xs + patch] - table[ys, xs + patch] - table[ys + patch, xs] + table[ys, xs]
    keep = counts >= min_overlap
    return keep if keep.any() else None


def _patch_scores(score_fn: PatchScorer, patches: np.ndarray) -> np.ndarray:
    scores = np.asarray(score_fn(patches), dtype=np.float32)
    n = len(patches)
    if scores.shape == (n,):
        return scores
    if scores.shape == patches.shape:
        flat = scores.reshape(n, -1)
        k = max(1, math.ceil(_TOP_SHARE * flat.shape[1]))
        return np.partition(flat, -k, axis=1)[:, -k:].mean(axis=1)
    msg = f"score_fn returned shape {scores.shape}; expected ({n},) or {patches.shape}"
    raise ValueError(msg)


def abnormal_patch_bank(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    patch: int,
    stride: int,
    score_fn: PatchScorer | None = None,
    top_k: int = 8,
    min_overlap: int = 1,
    with_masks: bool = False,
    detrend: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, AbnormalPatchSource]:
    """The discriminator's abnormal patches from confirmed abnormal images (method.md §3).

    Per image: (a) with a non-empty mask (H, W), the grid patches with >= ``min_overlap`` mask pixels
    (`mask_patch_selection`); (b) without one, or with a mask no grid patch overlaps that much, if ``score_fn``
    is given, its ``top_k`` highest-scoring grid patches; (c) else all.
    ``detrend`` (the run's `trainer.detrend.Detrend`) flattens each image, (H, W) in [0, 1], before its
    patches are cut, as the normal images are flattened for training.

    Returns:
        bank: (M, P, P) float32 in [0, 1] (M = 0 when there are no images); with ``with_masks``,
            (M, 2, P, P): channel 0 the patch, channel 1 where it is abnormal (its crop of the mask for
            source (a), all ones for (b) and (c), where nothing finer is known).
        source: the weakest source used by any image (ALL > MINED > MASK), NONE for no images.
    """
    if len(images) != len(masks):
        msg = f"got {len(images)} abnormal images but {len(masks)} masks (use None for an image without one)"
        raise ValueError(msg)
    if not 1 <= stride <= patch:
        msg = f"need 1 <= stride <= patch, got stride={stride} patch={patch}"
        raise ValueError(msg)
    if top_k < 1 or min_overlap < 1:
        msg = f"top_k and min_overlap must be >= 1, got {top_k}, {min_overlap}"
        raise ValueError(msg)
    chosen: list[np.ndarray] = []
    chosen_masks: list[np.ndarray] = []
    used: set[AbnormalPatchSource] = set()
    for image, mask in zip(images, masks, strict=True):
        patches, origins = grid_patches(detrend(image) if detrend else image, patch, stride)
        if mask is not None and mask.shape != image.shape:
            msg = f"mask shape {mask.shape} does not match its image {image.shape}"
            raise ValueError(msg)
        keep = mask_patch_selection(mask, patch, stride, min_overlap)
        if keep is not None:
            hits = np.asarray(mask) > 0
            chosen.append(patches[keep])
            kept = [origin for origin, k in zip(origins, keep, strict=True) if k]
            chosen_masks.append(np.stack([hits[y : y + patch, x : x + patch] for y, x in kept]))
            used.add(AbnormalPatchSource.MASK)
            continue
        if score_fn is not None:
            scores = _patch_scores(score_fn, patches)
            top = np.argsort(scores)[::-1][:top_k]
            chosen.append(patches[np.sort(top)])
            used.add(AbnormalPatchSource.MINED)
        else:
            chosen.append(patches)
            used.add(AbnormalPatchSource.ALL)
        chosen_masks.append(np.ones_like(chosen[-1]))
    if not chosen:
        empty = (0, 2, patch, patch) if with_masks else (0, patch, patch)
        return np.empty(empty, dtype=np.float32), AbnormalPatchSource.NONE
    bank = np.concatenate(chosen).astype(np.float32, copy=False)
    if with_masks:
        bank = np.stack([bank, np.concatenate(chosen_masks).astype(np.float32)], axis=1)  # (M, 2, P, P)
    for source in (AbnormalPatchSource.ALL, AbnormalPatchSource.MINED, AbnormalPatchSource.MASK):
        if source in used:
            return bank, source
    raise AssertionError("unreachable")  # every image adds to `used`


def augment(
    batch: np.ndarray, rng: np.random.Generator, brightness: float = 0.03, keep_orientation: bool = False
) -> np.ndarray:
    """Randomly flipped / rotated / brightness-shifted copies of ``batch`` (N, P, P) in [0, 1].

    ``keep_orientation=True`` restricts turns to 0° / 180°, which keep the direction of an anisotropic
    texture (brushing grain): use it for normal patches, whose grain direction is part of "normal".
    A (N, C, P, P) batch turns and flips all channels alike and shifts the brightness of channel 0 only
    (the others are masks, as in an ``abnormal_patch_bank(..., with_masks=True)`` bank).
    """
    if batch.ndim not in (3, 4) or batch.shape[-1] != batch.shape[-2]:
        msg = f"expected square patches (N, P, P) or (N, C, P, P), got shape {batch.shape}"
        raise ValueError(msg)
    n = len(batch)
    out = np.empty_like(batch, dtype=np.float32)
    turns = rng.integers(0, 2, size=n) * 2 if keep_orientation else rng.integers(0, 4, size=n)
    flips = np.zeros(n, dtype=bool) if keep_orientation else rng.random(n) < 0.5
    for i in range(n):
        patch = np.rot90(batch[i], k=int(turns[i]), axes=(-2, -1))
        out[i] = patch[..., ::-1] if flips[i] else patch
    if brightness > 0:
        image = out if batch.ndim == 3 else out[:, 0]  # a view: shifted in place
        image += rng.uniform(-brightness, brightness, size=(n, 1, 1)).astype(np.float32)
        np.clip(image, 0.0, 1.0, out=image)
    return out
