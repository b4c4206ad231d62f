"""Shared by the service tests: a small model version in the registry, and small job images.

card = register_small_model(store, "metal")    # untrained nets, calibrated on synthetic metal
png = small_png(seed=1)                        # a 128×128 synthetic image as PNG bytes
"""

from __future__ import annotations

import numpy as np

from schemas import ModelCard
from trainer.config import TrainConfig
from trainer.imaging import encode_png
from trainer.pipeline import initial_model_version
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind, synth_image

SIZE = 128
SMALL_CONFIG = TrainConfig(patch_size=32, stride=16, latent_dim=16, base_channels=8, smoothing_sigma=1.0)
"""A patch-32 architecture that scores a 128² image in a few milliseconds."""


def register_small_model(store: ObjectStore, name: str) -> ModelCard:
    """Save a patch-32 model version (untrained networks, calibrated thresholds) and return its card."""
    images = [synth_image(seed, SIZE)[0].astype(np.float32) / 255 for seed in range(3)]
    return initial_model_version(ModelRegistry(store, name), SMALL_CONFIG, images, data_digest="test")


def small_png(seed: int, defects: tuple[DefectKind, ...] = ()) -> bytes:
    """A SIZE×SIZE synthetic brushed-metal image (with ``defects``) as PNG bytes."""
    return encode_png(synth_image(seed, SIZE, defects)[0])
