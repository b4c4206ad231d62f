"""Shared by the service tests: a small model version in the registry, and small job images.

card = register_small_model(store, "metal")    # untrained nets, calibrated on synthetic metal
png = small_png(seed=1)                        # a 128×128 synthetic image as PNG bytes
"""

from __future__ import annotations

import numpy as np
import torch

from schemas import AbnormalPatchSource, ModelCard
from trainer.calibration import calibrate
from trainer.imaging import encode_png
from trainer.model_io import weights_to_bytes
from trainer.networks import build_networks
from trainer.registry import ModelRegistry, new_version_id
from trainer.scoring import PatchModel, anomaly_map
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind, synth_image

SIZE = 128


def register_small_model(store: ObjectStore, name: str) -> ModelCard:
    """Save a patch-32 model version (untrained networks, calibrated thresholds) and return its card."""
    torch.manual_seed(0)
    generator, discriminator, encoder = build_networks(patch_size=32, latent_dim=16, base_channels=8)
    state = {
        **{f"generator.{k}": v for k, v in generator.state_dict().items()},
        **{f"discriminator.{k}": v for k, v in discriminator.state_dict().items()},
        **{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
    }
    draft = ModelCard(
        name=name,
        version=new_version_id(),
        patch_size=32,
        stride=16,
        latent_dim=16,
        base_channels=8,
        gamma=1.0,
        abnormal_patch_source=AbnormalPatchSource.NONE,
        smoothing_sigma=1.0,
        data_digest="test",
        n_train_images=0,
        n_abnormal_images=0,
        thresholds={
            "pixel": 1.0,
            "image": 1.0,
            "pixel_quantile": 0.99,
            "image_quantile": 0.99,
            "n_calibration_images": 1,
        },
    )
    model = PatchModel.from_state(draft, state, device="cpu")
    maps = [anomaly_map(synth_image(seed, SIZE)[0].astype(np.float32) / 255, model) for seed in range(3)]
    card = draft.model_copy(update={"thresholds": calibrate(maps)})
    ModelRegistry(store, name).save(card, weights_to_bytes(state))
    return card


def small_png(seed: int, defects: tuple[DefectKind, ...] = ()) -> bytes:
    """A SIZE×SIZE synthetic brushed-metal image (with ``defects``) as PNG bytes."""
    return encode_png(synth_image(seed, SIZE, defects)[0])
