"""Cut an image into overlapping P×P patches and stitch per-patch maps back into one image.

Example: a 1024×1024 image with P = 64 and stride S = 32 is reflect-padded to 1056×1056 (so every
pixel is covered by the same number of windows, edges included) and cut into 32×32 = 1024 patches::

    layout = plan_tiles(1024, 1024, patch=64, stride=32)
    patches = extract_patches(image, layout)          # (1024, 64, 64)
    full = stitch_patches(patch_maps, layout)         # (1024, 1024)

Overlaps are averaged under a smooth (Hann-like) window, so seams do not show. Stitching the
patches of an image gives the image back exactly, for any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np


@dataclass(frozen=True)
class TileLayout:
    """Where the patches of one image lie. ``origins[i]`` is patch i's (y, x) in the padded image."""

    height: int
    width: int
    patch: int
    stride: int
    pad: int
    padded_height: int
    padded_width: int
    origins: tuple[tuple[int, int], ...]

    @property
    def n_patches(self) -> int:
        """Number of patches."""
        return len(self.origins)


def _axis_origins(length: int, patch: int, stride: int) -> list[int]:
    last = max(length - patch, 0)
    origins = list(range(0, last + 1, stride))
    if origins[-1] != last:
        origins.append(last)
    return origins


def plan_tiles(height: int, width: int, patch: int, stride: int) -> TileLayout:
    """Plan the patch grid of an H×W image.

    The image is reflect-padded by ``patch - stride`` on each side (at least enough to reach one
    full patch), so border pixels are covered by as many windows as interior ones.
    """
    if patch < 1 or stride < 1 or stride > patch:
        msg = f"need 1 <= stride <= patch, got patch={patch} stride={stride}"
        raise ValueError(msg)
    if height < 1 or width < 1:
        msg = f"image must be at least 1×1, got {height}×{width}"
        raise ValueError(msg)
    pad = patch - stride
    padded_h = max(height + 2 * pad, patch)
    padded_w = max(width + 2 * pad, patch)
    ys = _axis_origins(padded_h, patch, stride)
    xs = _axis_origins(padded_w, patch, stride)
    origins = tuple((y, x) for y in ys for x in xs)
    return TileLayout(height, width, patch, stride, pad, padded_h, padded_w, origins)


def _pad(image: np.ndarray, layout: TileLayout) -> np.ndarray:
    top = left = layout.pad
    bottom = layout.padded_height - layout.height - top
    right = layout.padded_width - layout.width - left
    mode = "reflect" if min(layout.height, layout.width) > max(top, bottom, left, right) else "symmetric"
    if min(layout.height, layout.width) <= 1:
        mode = "edge"
    return np.pad(image, ((top, bottom), (left, right)), mode=mode)


def extract_patches(image: np.ndarray, layout: TileLayout) -> np.ndarray:
    """Cut ``image`` (H, W) into patches (N, P, P), in the order of ``layout.origins``."""
    if image.shape != (layout.height, layout.width):
        msg = f"image shape {image.shape} does not match layout {(layout.height, layout.width)}"
        raise ValueError(msg)
    padded = _pad(np.asarray(image, dtype=np.float32), layout)
    p = layout.patch
    out = np.empty((layout.n_patches, p, p), dtype=np.float32)
    for i, (y, x) in enumerate(layout.origins):
        out[i] = padded[y : y + p, x : x + p]
    return out


@cache
def patch_window(patch: int) -> np.ndarray:
    """A smooth (P, P) weight, highest in the patch centre and small but positive at its edges."""
    ramp = np.hanning(patch + 2)[1:-1].astype(np.float32)  # strictly positive
    return np.outer(ramp, ramp)


def stitch_patches(patch_maps: np.ndarray, layout: TileLayout) -> np.ndarray:
    """Stitch per-patch maps (N, P, P) into one (H, W) map: a window-weighted mean of overlaps."""
    p = layout.patch
    if patch_maps.shape != (layout.n_patches, p, p):
        msg = f"patch maps have shape {patch_maps.shape}, layout expects {(layout.n_patches, p, p)}"
        raise ValueError(msg)
    window = patch_window(p)
    total = np.zeros((layout.padded_height, layout.padded_width), dtype=np.float64)
    weight = np.zeros_like(total)
    for patch_map, (y, x) in zip(patch_maps, layout.origins, strict=True):
        total[y : y + p, x : x + p] += patch_map * window
        weight[y : y + p, x : x + p] += window
    stitched = total / weight
    top = left = layout.pad
    return stitched[top : top + layout.height, left : left + layout.width].astype(np.float32)
