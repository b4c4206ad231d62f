"""One image through the model: tile → score patch batches → stitch → smooth → summarise.

The same steps serve the Ray Serve app (patch batches spread over `PatchScorer` replicas) and the
in-process `LocalInspector` (benchmarks, archive re-scoring), so both give identical maps::

    plan = plan_inspection(image, card, chunk_patches=128)   # patches (N, P, P) in chunks
    patch_maps = [model.score_patches(c) for c in plan.chunks]
    scored = finish_inspection(plan, patch_maps, card)      # ScoredImage with an (H, W) map
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from schemas import ModelCard
from trainer.postprocess import MapSummary, summarize_map
from trainer.scoring import PatchModel, anomaly_map, finish_map
from trainer.tiling import TileLayout, extract_patches, plan_tiles, stitch_patches


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

    def __call__(self, image: np.ndarray, pixel_threshold: float | None = None) -> ScoredImage:
        """Score ``image``; ``pixel_threshold`` overrides the model card's. Raises `ScoringBusy` when full."""
        ...


@dataclass(frozen=True)
class InspectionPlan:
    """An image cut into patch chunks, ready to be scored."""

    layout: TileLayout
    chunks: list[np.ndarray]


def plan_inspection(image: np.ndarray, card: ModelCard, chunk_patches: int) -> InspectionPlan:
    """Tile ``image`` (H, W) with the card's patch size and stride; chunks of ≤ ``chunk_patches``."""
    if image.ndim != 2:
        msg = f"expected a greyscale (H, W) image, got shape {image.shape}"
        raise ValueError(msg)
    if chunk_patches < 1:
        msg = f"chunk_patches must be >= 1, got {chunk_patches}"
        raise ValueError(msg)
    layout = plan_tiles(image.shape[0], image.shape[1], card.patch_size, card.stride)
    patches = extract_patches(image, layout)
    n_chunks = -(-layout.n_patches // chunk_patches)
    chunks = [patches[i * chunk_patches : (i + 1) * chunk_patches] for i in range(n_chunks)]
    return InspectionPlan(layout, chunks)


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
    patch_maps: list[np.ndarray],
    card: ModelCard,
    pixel_threshold: float | None = None,
    timings_ms: dict[str, float] | None = None,
) -> ScoredImage:
    """Stitch scored chunks (each (n_i, P, P)) into the smoothed map and summarise it."""
    stitched = stitch_patches(np.concatenate(patch_maps, axis=0), plan.layout)
    anomaly_map = finish_map(stitched, card.smoothing_sigma)
    return scored_image(anomaly_map, card, plan.layout.n_patches, len(plan.chunks), pixel_threshold, timings_ms)


class LocalInspector:
    """Scores images in this process with one `PatchModel` (no Serve); the same maps as the Serve app."""

    def __init__(self, model: PatchModel, chunk_patches: int = 256) -> None:
        self.model = model
        self.chunk_patches = chunk_patches

    def __call__(self, image: np.ndarray, pixel_threshold: float | None = None) -> ScoredImage:
        """Score ``image`` (H, W) float32 in [0, 1]."""
        card = self.model.card
        n_patches = plan_tiles(image.shape[0], image.shape[1], card.patch_size, card.stride).n_patches
        amap = anomaly_map(image, self.model, batch_size=self.chunk_patches)
        return scored_image(amap, card, n_patches, -(-n_patches // self.chunk_patches), pixel_threshold)
