"""Cut an image into overlapping P×P patches and stitch per-patch maps back into one image.

Example: a 1024×1024 image with P = 64 and stride S = 32 is reflect-padded by P − S = 32 to 1088×1088
(so every pixel is covered by the same number of windows, edges included) and cut into 33×33 = 1089
patches::

    layout = plan_tiles(1024, 1024, patch=64, stride=32)
    patches = extract_patches(image, layout)          # (1089, 64, 64)
    part = cut_patches(pad_image(image, layout), 64, layout.grid, 128, 256)   # patches 128..255
    full = stitch_patches(patch_maps, layout)         # (1024, 1024); also from a list of chunks

    band = map_band(part_maps, layout.patch, layout.stride, layout.grid, layout.padded_width, 128)
    band.values.shape                                 # (192, 1088): grid rows 3..7 of patches 128..255
    full = stitch_bands([band, ...], layout)          # the same map from the bands of all ranges

Overlaps are averaged under a smooth (Hann-like) window, so seams do not show. Stitching the
patches of an image gives the image back exactly, for any size. A band is the windowed sum of
one range of patches over the rows it touches: a scorer that sends it instead of its (n, P, P)
maps sends ~3× fewer bytes (P = 32, S = 16), and the stitcher only adds bands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache

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

    @cached_property
    def grid(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The distinct patch rows and columns (ys, xs): ``origins`` is their product, row-major."""
        return tuple(dict.fromkeys(y for y, _ in self.origins)), tuple(dict.fromkeys(x for _, x in self.origins))


def _axis_origins(length: int, patch: int, stride: int) -> list[int]:
    last = max(length - patch, 0)
    origins = list(range(0, last + 1, stride))
    if origins[-1] != last:
        origins.append(last)
    return origins


@lru_cache(maxsize=16)  # ≤ 12 MB each (66 049 origins at 4096²), ~1 MB at 1024²
def plan_tiles(height: int, width: int, patch: int, stride: int) -> TileLayout:
    """Plan the patch grid of an H×W image.

    The image is reflect-padded by ``patch - stride`` on each side (at least enough to reach one
    full patch), so border pixels are covered by as many windows as interior ones. Plans are
    immutable and cached (the last 16 shapes): a stream of same-sized images plans once (4225 origins
    at 1024², P = 32).
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


def pad_image(image: np.ndarray, layout: TileLayout) -> np.ndarray:
    """The padded (Hp, Wp) float32 image that ``layout.origins`` index into (reflect padding)."""
    if image.shape != (layout.height, layout.width):
        msg = f"image shape {image.shape} does not match layout {(layout.height, layout.width)}"
        raise ValueError(msg)
    top = left = layout.pad
    bottom = layout.padded_height - layout.height - top
    right = layout.padded_width - layout.width - left
    mode = "reflect" if min(layout.height, layout.width) > max(top, bottom, left, right) else "symmetric"
    if min(layout.height, layout.width) <= 1:
        mode = "edge"
    return np.pad(np.asarray(image, dtype=np.float32), ((top, bottom), (left, right)), mode=mode)


def cut_patches(
    padded: np.ndarray, patch: int, grid: tuple[Sequence[int], Sequence[int]], start: int = 0, stop: int | None = None
) -> np.ndarray:
    """Patches ``start``..``stop`` (row-major over ``grid`` = (ys, xs), as in `TileLayout.grid`) of a padded image.

    (Hp, Wp) -> (stop - start, P, P) float32, a new array; ``padded`` may be read-only (zero-copy from Ray's
    object store), so a scorer can cut its own share of an image.
    """
    ys, xs = (np.asarray(axis, dtype=np.intp) for axis in grid)
    stop = len(ys) * len(xs) if stop is None else stop
    if not 0 <= start <= stop <= len(ys) * len(xs):
        msg = f"patch range {start}..{stop} is outside the grid of {len(ys)}×{len(xs)} patches"
        raise ValueError(msg)
    index = np.arange(start, stop)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (patch, patch))  # (Hp-P+1, Wp-P+1, P, P), a view
    return np.asarray(windows[ys[index // len(xs)], xs[index % len(xs)]], dtype=np.float32)


def extract_patches(image: np.ndarray, layout: TileLayout) -> np.ndarray:
    """Cut ``image`` (H, W) into patches (N, P, P), in the order of ``layout.origins``."""
    return cut_patches(pad_image(image, layout), layout.patch, layout.grid)


@cache
def patch_window_ramp(patch: int) -> np.ndarray:
    """The (P,) float32 factor of `patch_window`: a Hann ramp, strictly positive at both ends."""
    return np.hanning(patch + 2)[1:-1].astype(np.float32)


def patch_window(patch: int) -> np.ndarray:
    """A smooth (P, P) weight, highest in the patch centre and small but positive at its edges."""
    ramp = patch_window_ramp(patch)
    return np.outer(ramp, ramp)


def covers_block_grid(
    grid: tuple[Sequence[int], Sequence[int]], patch: int, stride: int, shape: tuple[int, int]
) -> bool:
    """Whether every origin lies on the stride grid from 0, P is a multiple of S and the patches exactly
    cover the (h, w) image (e.g. 1024², P = 64, S = 32)."""
    ys, xs = grid
    s = stride
    return (
        patch % s == 0
        and tuple(ys) == tuple(range(0, len(ys) * s, s))
        and tuple(xs) == tuple(range(0, len(xs) * s, s))
        and shape == ((len(ys) - 1) * s + patch, (len(xs) - 1) * s + patch)
    )


def _overlap_add(values: np.ndarray, layout: TileLayout) -> np.ndarray:
    """Sum (N, P, P) float32 patch values into the padded (Hp, Wp) float64 image, each pixel's terms in patch order."""
    shape = (layout.padded_height, layout.padded_width)
    return _overlap_add_grid(values, layout.grid, layout.patch, layout.stride, shape)


def _overlap_add_grid(
    values: np.ndarray, grid: tuple[Sequence[int], Sequence[int]], patch: int, stride: int, shape: tuple[int, int]
) -> np.ndarray:
    """Sum (ny·nx, P, P) values at the origins ``grid`` = (ys, xs) (row-major) into a (h, w) float64 image.

    On a block grid (`covers_block_grid`) a patch is k × k blocks of S × S (k = P / S), and block (u, v) of patch
    (iy, ix) lands on image block (iy + u, ix + v); adding one (u, v) at a time for all patches, u and v
    descending, gives every pixel its terms in row-major patch order, as the per-patch loop does, so the
    sums are identical.
    """
    p, s = patch, stride
    total = np.zeros(shape, dtype=np.float64)
    ys, xs = grid
    if not covers_block_grid(grid, patch, stride, shape):
        for value, (y, x) in zip(values, ((y, x) for y in ys for x in xs), strict=True):
            total[y : y + p, x : x + p] += value
        return total
    k = p // s
    ny, nx = len(ys), len(xs)
    # [u, v, iy, row, ix, col] in one strided copy, so that every add below reads rows of nx·S contiguous
    # values and writes contiguous runs of total: ~15 % faster than adding the strided views directly
    blocks = np.ascontiguousarray(values.reshape(ny, nx, k, s, k, s).transpose(2, 4, 0, 3, 1, 5))
    for u in reversed(range(k)):
        for v in reversed(range(k)):
            rows = total[u * s : (u + ny) * s, v * s : (v + nx) * s]  # a view of total
            rows += blocks[u, v].reshape(ny * s, nx * s)
    return total


@lru_cache(maxsize=256)  # two (Hp,) + (Wp,) float64 vectors: 130 kB at the largest image (8192 × 2048)
def _axis_weights(height: int, width: int, patch: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The stitching denominator of a layout as two factors, (Hp,) and (Wp,) float64, read-only.

    The window is ``outer(ramp, ramp)`` and the origins are every (row, column) pair of the grid, so
    the padded sum of windows is ``outer(rows, cols)``, with ``rows`` the ramps added at each patch
    row and ``cols`` at each patch column: a few kB to cache where the 2-D sum is 136 MB at 4096².
    """
    layout = plan_tiles(height, width, patch, stride)
    ramp = patch_window_ramp(patch).astype(np.float64)
    factors = []
    for origins, length in zip(layout.grid, (layout.padded_height, layout.padded_width), strict=True):
        total = np.zeros(length, dtype=np.float64)
        for origin in origins:
            total[origin : origin + patch] += ramp
        total.flags.writeable = False
        factors.append(total)
    return factors[0], factors[1]


def stitch_patches(patch_maps: np.ndarray | Sequence[np.ndarray], layout: TileLayout) -> np.ndarray:
    """Stitch per-patch maps (N, P, P) into one (H, W) map: a window-weighted mean of overlaps.

    ``patch_maps`` may also be the maps in consecutive chunks (n_i, P, P), as scorers return them.
    """
    p = layout.patch
    chunks = [patch_maps] if isinstance(patch_maps, np.ndarray) else list(patch_maps)
    shapes = {chunk.shape[1:] for chunk in chunks}
    n = sum(len(chunk) for chunk in chunks)
    if (n, *shapes) != (layout.n_patches, (p, p)) or any(chunk.ndim != 3 for chunk in chunks):
        got = chunks[0].shape if len(chunks) == 1 else [chunk.shape for chunk in chunks]
        msg = f"patch maps have shape {got}, layout expects {(layout.n_patches, p, p)}"
        raise ValueError(msg)
    weighted = np.empty((n, p, p), dtype=np.float32)
    offset = 0
    for chunk in chunks:  # concatenating and weighting in one pass
        np.multiply(np.asarray(chunk, dtype=np.float32), patch_window(p), out=weighted[offset : offset + len(chunk)])
        offset += len(chunk)
    return _divide_by_weight(_overlap_add(weighted, layout), layout)


def _divide_by_weight(total: np.ndarray, layout: TileLayout) -> np.ndarray:
    """The window-weighted mean: the padded (Hp, Wp) sum divided by the window weights, cropped -> (H, W) float32."""
    rows, cols = _axis_weights(layout.height, layout.width, layout.patch, layout.stride)
    y, x = slice(layout.pad, layout.pad + layout.height), slice(layout.pad, layout.pad + layout.width)
    mean = total[y, x] / rows[y, None]
    mean /= cols[x]
    return mean.astype(np.float32)


@dataclass(frozen=True)
class MapBand:
    """The window-weighted sum of a range of patch maps over the padded rows it touches.

    ``values`` (h, Wp) float32 covers padded rows ``top`` .. ``top + h``; ``n_patches`` says how many
    patches it holds, so a stitcher can tell that every patch of the image arrived.
    """

    top: int
    values: np.ndarray
    n_patches: int


def map_band(
    patch_maps: np.ndarray,
    patch: int,
    stride: int,
    grid: tuple[Sequence[int], Sequence[int]],
    padded_width: int,
    start: int,
) -> MapBand:
    """Weight patches ``start`` .. ``start + n`` (row-major over ``grid``, as in `TileLayout.grid`) of a
    layout and sum their overlaps: (n, P, P) -> a `MapBand` of the grid rows they touch (float32).

    A range that starts or ends inside a grid row is completed with zero maps, which add nothing. A
    1024² image's range of 896 patches (P = 32, S = 16) is a band of 256 × 1056: 1.1 MB, where its
    maps are 3.7 MB.
    """
    n, xs = len(patch_maps), grid[1]
    if patch_maps.ndim != 3 or patch_maps.shape[1:] != (patch, patch) or n < 1:
        msg = f"patch maps have shape {patch_maps.shape}, expected (n >= 1, {patch}, {patch})"
        raise ValueError(msg)
    top, rows, offset = range_rows(grid, start, start + n)
    weighted = np.zeros((len(rows) * len(xs), patch, patch), dtype=np.float32)
    np.multiply(patch_maps, patch_window(patch), out=weighted[offset : offset + n])
    total = _overlap_add_grid(weighted, (rows, xs), patch, stride, (rows[-1] + patch, padded_width))
    return MapBand(top, total.astype(np.float32), n)


def range_rows(grid: tuple[Sequence[int], Sequence[int]], start: int, stop: int) -> tuple[int, list[int], int]:
    """The grid rows that patches ``start`` .. ``stop`` (row-major over ``grid`` = (ys, xs)) touch.

    Returns (top, rows, offset): the first row's padded y, the rows' origins relative to it, and the range's
    first patch's index among those rows' patches (``start`` − first row × columns).
    """
    ys, xs = grid
    nx = len(xs)
    if not 0 <= start < stop <= len(ys) * nx:
        msg = f"patch range {start}..{stop} is outside the grid of {len(ys)}×{nx} patches"
        raise ValueError(msg)
    first_row, last_row = start // nx, (stop - 1) // nx
    top = ys[first_row]
    return top, [y - top for y in ys[first_row : last_row + 1]], start - first_row * nx


def stitch_bands(bands: Sequence[MapBand], layout: TileLayout) -> np.ndarray:
    """Stitch the bands of all an image's patch ranges (`map_band`) into one (H, W) float32 map.

    The same map as `stitch_patches` of the ranges' maps, to float32 rounding (each band's sum is
    rounded once before the bands are added).
    """
    n = sum(band.n_patches for band in bands)
    if n != layout.n_patches:
        msg = f"the bands hold {n} patches, layout expects {layout.n_patches}"
        raise ValueError(msg)
    total = np.zeros((layout.padded_height, layout.padded_width), dtype=np.float64)
    for band in bands:
        rows = band.values.shape[0]
        if band.values.ndim != 2 or band.values.shape[1] != layout.padded_width or band.top + rows > len(total):
            msg = f"band at row {band.top} of shape {band.values.shape} does not fit the padded image {total.shape}"
            raise ValueError(msg)
        total[band.top : band.top + rows] += band.values
    return _divide_by_weight(total, layout)
