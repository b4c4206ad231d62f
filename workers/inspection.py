"""One image through the model: tile → score patch batches → stitch → finish (smooth, line filter) → summarise.

The same steps serve the Ray Serve app (patch batches spread over `PatchScorer` replicas) and the
in-process `LocalInspector` (benchmarks, archive re-scoring), so both give the same maps (to float32 rounding)::

    plan = plan_inspection(image, card, chunk_patches=128)   # padded image + patch ranges of ≤ 128
    bands = [r.band(model.score_patches(r.cut(plan.padded))) for r in plan.ranges]   # a `MapBand` per range
    scored = finish_inspection(plan, bands, card)            # ScoredImage with an (H, W) map

The Serve app does not ship the chunks: it puts ``plan.padded`` in Ray's object store once and sends
each scorer a `PatchRange`, which the scorer cuts out of the (zero-copy) padded image itself. Nor do
the scorers ship their (n, P, P) maps back: each sends its range's band, the windowed sum of its maps
over the rows they touch (5.0 MB for a 1024² image at P = 32, S = 16, where the maps are 17.3 MB), so
the ingress only adds five bands and divides (4 ms, where stitching 4225 maps took 20–25 ms).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from schemas import ModelCard
from trainer.detrend import Detrend
from trainer.device_tiling import RangeStrip, cut_strip, fold_strip, range_strip
from trainer.patches import as_unit_float
from trainer.postprocess import MapSummary, summarize_map
from trainer.scoring import PatchModel, anomaly_map, finish_card_map
from trainer.tiling import MapBand, TileLayout, cut_patches, map_band, pad_image, plan_tiles, stitch_bands

CHUNK_PATCHES = 1024
"""Default largest scorer request: a 1024² image is 5 requests at P = 32, S = 16, and 2 at P = 64, S = 32."""
GPU_CHUNK_PATCHES = 2048
"""A GPU scorer's default largest request: a 1024² image in three requests, not five (the Serve path ran 16 %
faster on an H200; docs/benchmarks.md, seventh session). The scorers' batch limit is set to match."""
CPU_FORWARD_PATCHES = 128
"""A CPU scorer's largest forward pass (see `score_in_batches`): small batches stay in cache."""
GPU_FORWARD_PATCHES = 2048
"""A GPU scorer's largest forward pass: on an H200 the demo model ran 59, 98, 132 and 225 images/s in
passes of 512, 1024, 2048 and 4225 patches (launch-bound; docs/benchmarks.md, seventh session)."""


def default_sizes(on_gpu: bool) -> tuple[int, int]:
    """(chunk_patches, forward_patches): a scorer's largest request and forward pass on a GPU or a CPU."""
    return (GPU_CHUNK_PATCHES, GPU_FORWARD_PATCHES) if on_gpu else (CHUNK_PATCHES, CPU_FORWARD_PATCHES)


@dataclass(frozen=True)
class ScoredImage:
    """What scoring one image returns: the raw (H, W) float32 map and its summary."""

    anomaly_map: np.ndarray
    summary: MapSummary
    model_version: str
    pixel_threshold: float
    image_threshold: float
    n_patches: int
    n_batches: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class ScoringBusy(Exception):
    """The scorer refused an image because its queues are full (Serve backpressure); try again later.

    Nothing was scored or written for it: the same image can be sent again as it is.
    """


class Inspector(Protocol):
    """Anything that scores one (H, W) float32 image in [0, 1]."""

    def __call__(self, image: np.ndarray, pixel_threshold: float | None = None, line: str = "default") -> ScoredImage:
        """Score ``image`` with the model of ``line``; ``pixel_threshold`` overrides the model card's.

        Raises `ScoringBusy` when full.
        """
        ...


@dataclass(frozen=True)
class PatchRange:
    """Patches ``start``..``stop`` (row-major) of an image's tile grid: one scorer request's share.

    A few hundred bytes, where the patches themselves are 4 KiB (P = 32) or 16 KiB (P = 64) each: the
    scorer cuts them out of the padded image (`cut`), which travels once per image instead of 4× over
    in patches that overlap by half.
    """

    start: int
    stop: int
    patch: int
    stride: int
    grid: tuple[tuple[int, ...], tuple[int, ...]]
    """`TileLayout.grid`: the padded image's patch rows and columns."""
    padded_width: int

    def __len__(self) -> int:
        return self.stop - self.start

    def cut(self, padded: np.ndarray) -> np.ndarray:
        """This range's patches (n, P, P) float32 of the padded image (Hp, Wp)."""
        return cut_patches(padded, self.patch, self.grid, self.start, self.stop)

    def band(self, patch_maps: np.ndarray) -> MapBand:
        """This range's maps (n, P, P), window-weighted and summed over the padded rows they touch (`map_band`)."""
        if len(patch_maps) != len(self):
            msg = f"patch range {self.start}..{self.stop} got {len(patch_maps)} maps"
            raise ValueError(msg)
        return map_band(patch_maps, self.patch, self.stride, self.grid, self.padded_width, self.start)

    def strip(self) -> RangeStrip | None:
        """The padded rows this range touches, when they form a block strip (`trainer.device_tiling`)."""
        return range_strip(self.patch, self.stride, self.grid, self.padded_width, self.start, self.stop)


@dataclass(frozen=True)
class InspectionPlan:
    """An image padded for tiling and its patches split into ranges, ready to be scored."""

    layout: TileLayout
    padded: np.ndarray
    """(Hp, Wp) float32, the image reflect-padded as `TileLayout` describes."""
    ranges: list[PatchRange]

    @property
    def chunks(self) -> list[np.ndarray]:
        """The patches of each range, (n_i, P, P) float32, cut out now (for scoring in this process)."""
        return [patch_range.cut(self.padded) for patch_range in self.ranges]

    def bands(self, patch_maps: list[np.ndarray]) -> list[MapBand]:
        """Each range's band from its scored maps (n_i, P, P), in the order of ``ranges``."""
        return [r.band(maps) for r, maps in zip(self.ranges, patch_maps, strict=True)]


def plan_inspection(image: np.ndarray, card: ModelCard, chunk_patches: int, batch_patches: int = 1) -> InspectionPlan:
    """Flatten ``image`` (H, W) in [0, 1] (uint8 and uint16 are scaled first, `as_unit_float`) as the card's version
    was trained (`trainer.detrend`), pad it for the card's patch size and stride and split its patches into ranges.

    Ranges hold whole forward batches of ``batch_patches`` (at most ``chunk_patches``), as many as fit in
    ``chunk_patches``, and are as few and as even as that allows; each starts at a multiple of the batch,
    so scorers run the same forward passes as `LocalInspector` with that batch size. 4225 patches
    (1024², P = 32, S = 16) in chunks of ≤ 1024 and batches of 128: 34 batches in 5 ranges of
    768, 896, 896, 896 and 769 patches.
    """
    if image.ndim != 2:
        msg = f"expected a greyscale (H, W) image, got shape {image.shape}"
        raise ValueError(msg)
    if chunk_patches < 1 or batch_patches < 1:
        msg = f"chunk_patches and batch_patches must be >= 1, got {chunk_patches} and {batch_patches}"
        raise ValueError(msg)
    # scaled whether or not the card flattens (Detrend scales only when active): the plan of a uint8 image is that
    # of the same image in [0, 1]; float input passes as it is
    image = Detrend.of(card.train_config)(as_unit_float(image))  # as the version was trained (trainer.detrend)
    layout = plan_tiles(image.shape[0], image.shape[1], card.patch_size, card.stride)
    grid, n = layout.grid, layout.n_patches
    batch = min(batch_patches, chunk_patches)
    n_batches = -(-n // batch)
    n_ranges = -(-n_batches // (chunk_patches // batch))
    bounds = [min(n, (n_batches * i // n_ranges) * batch) for i in range(n_ranges + 1)]
    ranges = [
        PatchRange(start, stop, layout.patch, layout.stride, grid, layout.padded_width)
        for start, stop in itertools.pairwise(bounds)
    ]
    return InspectionPlan(layout, pad_image(image, layout), ranges)


def score_ranges(
    model: PatchModel, ranges: list[PatchRange], padded: list[np.ndarray], forward_patches: int
) -> list[MapBand]:
    """Score patch ranges of padded images (Hp_i, Wp_i) with one model -> each range's `MapBand`.

    The patches are cut on the model's device (only the rows a range touches travel there) and, on a GPU,
    the maps are summed into bands there too (`trainer.device_tiling`), so only the bands come back; on a
    CPU, and for ranges that are no block strip, `PatchRange.band` sums them on the host. Forward passes
    hold at most ``forward_patches`` patches, consecutive ranges sharing one when they fit, so small
    images' ranges are batched together; a range of whole forward passes is scored exactly as
    `trainer.scoring.score_in_batches` would.
    """
    if forward_patches < 1:
        msg = f"forward_patches must be >= 1, got {forward_patches}"
        raise ValueError(msg)
    strips = [patch_range.strip() for patch_range in ranges]
    chunks = [
        cut_strip(image, strip, model.device)
        if strip is not None
        else torch.from_numpy(patch_range.cut(image)).to(model.device)[:, None]
        for patch_range, strip, image in zip(ranges, strips, padded, strict=True)
    ]
    maps = _score_chunks(model, chunks, forward_patches)
    on_host = model.device.type == "cpu"
    return [
        patch_range.band(chunk_maps[:, 0].cpu().numpy()) if on_host or strip is None else fold_strip(chunk_maps, strip)
        for patch_range, strip, chunk_maps in zip(ranges, strips, maps, strict=True)
    ]


def _score_chunks(model: PatchModel, chunks: list[torch.Tensor], forward_patches: int) -> list[torch.Tensor]:
    """Maps of chunks (n_i, 1, P, P) on the model's device, in forward passes of <= ``forward_patches`` that
    consecutive chunks share when they fit together -> maps (n_i, 1, P, P), one per chunk."""
    sizes = [len(chunk) for chunk in chunks]
    maps: list[torch.Tensor] = []
    group: list[torch.Tensor] = []
    for chunk in [*chunks, None]:
        if group and (chunk is None or sum(map(len, group)) + len(chunk) > forward_patches):
            patches = group[0] if len(group) == 1 else torch.cat(group)
            maps.extend(
                model.score_tensor(patches[i : i + forward_patches]) for i in range(0, len(patches), forward_patches)
            )
            group = []
        if chunk is not None:
            group.append(chunk)
    return list(torch.cat(maps).split(sizes))


def scored_image(
    anomaly_map: np.ndarray,
    card: ModelCard,
    n_patches: int,
    n_batches: int,
    pixel_threshold: float | None = None,
    timings_ms: dict[str, float] | None = None,
) -> ScoredImage:
    """Summarise a finished (H, W) map under the card's thresholds (or a pixel-threshold override)."""
    threshold = pixel_threshold if pixel_threshold is not None else card.thresholds.pixel
    return ScoredImage(
        anomaly_map=anomaly_map,
        summary=summarize_map(anomaly_map, card.thresholds, pixel_threshold=threshold),
        model_version=card.version,
        pixel_threshold=threshold,
        image_threshold=card.thresholds.image,
        n_patches=n_patches,
        n_batches=n_batches,
        timings_ms=dict(timings_ms or {}),
    )


def finish_inspection(
    plan: InspectionPlan,
    bands: list[MapBand],
    card: ModelCard,
    pixel_threshold: float | None = None,
    timings_ms: dict[str, float] | None = None,
) -> ScoredImage:
    """Stitch the ranges' bands (`PatchRange.band`, one per range) into the smoothed map and summarise it."""
    stitched = stitch_bands(bands, plan.layout)
    anomaly_map = finish_card_map(stitched, card)
    return scored_image(anomaly_map, card, plan.layout.n_patches, len(plan.ranges), pixel_threshold, timings_ms)


class LocalInspector:
    """Scores images in this process with one `PatchModel` (no Serve); the same maps as the Serve app (to
    float32 rounding), in forward passes of ``chunk_patches``.

    On a CPU it cuts, scores and stitches on the host (`trainer.scoring.anomaly_map`, as it always has:
    on machine A the two ways ran within the machine's noise of each other, docs/benchmarks.md). On a
    GPU it plans and scores as a Serve scorer does (`inspect_in_ranges`), so the patches are cut and the
    bands summed on the GPU: 142 against 30 images/s for the scoring step on an H200.
    """

    def __init__(self, model: PatchModel, chunk_patches: int = 256) -> None:
        if chunk_patches < 1:
            msg = f"chunk_patches must be >= 1, got {chunk_patches}"
            raise ValueError(msg)
        self.model = model
        self.chunk_patches = chunk_patches

    def __call__(self, image: np.ndarray, pixel_threshold: float | None = None, line: str = "default") -> ScoredImage:
        """Score ``image`` (H, W) in [0, 1] (uint8 and uint16 are scaled) with this inspector's one model
        (for every ``line``)."""
        card, forward = self.model.card, self.chunk_patches
        if self.model.device.type == "cpu":
            n_patches = plan_tiles(image.shape[0], image.shape[1], card.patch_size, card.stride).n_patches
            amap = anomaly_map(image, self.model, batch_size=forward)
            return scored_image(amap, card, n_patches, -(-n_patches // forward), pixel_threshold)
        return inspect_in_ranges(self.model, image, forward, pixel_threshold)


def inspect_in_ranges(
    model: PatchModel, image: np.ndarray, forward_patches: int, pixel_threshold: float | None = None
) -> ScoredImage:
    """Score ``image`` (H, W) in [0, 1] (uint8 and uint16 are scaled) in one process the way the Serve app
    does: ranges of ``max(CHUNK_PATCHES, forward_patches)`` (`plan_inspection`), `score_ranges` in passes of
    ``forward_patches``, `finish_inspection`."""
    card = model.card
    plan = plan_inspection(as_unit_float(image), card, max(CHUNK_PATCHES, forward_patches), forward_patches)
    bands = score_ranges(model, plan.ranges, [plan.padded] * len(plan.ranges), forward_patches)
    return finish_inspection(plan, bands, card, pixel_threshold)
