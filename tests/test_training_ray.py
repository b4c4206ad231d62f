"""Training under Ray Train (2 CPU workers, gloo): weights come back, checkpoints land in storage,
and a whole model version is trained, calibrated and registered."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas import AbnormalPatchSource
from trainer.config import TrainConfig
from trainer.distributed import CHECKPOINT_FILE, load_checkpoint_dir, run_training
from trainer.networks import build_networks
from trainer.pipeline import train_model_version
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel, anomaly_map
from trainer.store import ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(60, 200, (size, size), dtype=np.uint8) for _ in range(n)]


def test_run_training_returns_weights_and_leaves_checkpoints(ray_cluster: str, tmp_path: Path) -> None:
    cfg = TrainConfig.tiny()
    run_name = f"test-{uuid.uuid4().hex[:8]}"
    state = run_training(cfg, _images(2), None, str(tmp_path), run_name)

    g, d, e = build_networks(cfg.patch_size, cfg.latent_dim, cfg.base_channels, cfg.spectral_norm)
    for prefix, net in (("generator", g), ("discriminator", d), ("encoder", e)):
        expected = {f"{prefix}.{k}" for k in net.state_dict()}
        assert expected <= state.keys(), prefix  # un-DDP'd names: no "module."
    assert not any(".module." in key for key in state)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    files = sorted((tmp_path / run_name).rglob(CHECKPOINT_FILE))
    assert files, "no checkpoint written"
    steps = sorted(load_checkpoint_dir(f.parent)[1] for f in files)
    assert steps[-1] == cfg.total_steps  # steps_per_epoch=3: checkpoints at 3 and 6


def test_train_model_version_registers_a_calibrated_card(
    ray_cluster: str, tmp_path: Path, object_store: ObjectStore
) -> None:
    cfg = TrainConfig.tiny(gamma=0.5)
    abnormal = _images(1, seed=1)
    mask = np.zeros((64, 64), dtype=bool)
    mask[40:42, 5:50] = True
    registry = ModelRegistry(object_store, "metal")
    messages: list[str] = []

    card = train_model_version(
        cfg,
        _images(2),
        abnormal,
        [mask],
        _images(2, seed=2),
        registry,
        name="metal",
        data_digest="sha256:test",
        storage_path=str(tmp_path),
        progress=messages.append,
    )
    assert card.abnormal_patch_source == AbnormalPatchSource.MASK
    assert card.gamma == 0.5 and card.n_abnormal_images == 1 and card.patch_size == 32
    assert card.thresholds.n_calibration_images == 2 and card.thresholds.pixel > 0
    assert registry.versions() == [card.version]
    stored_card, weights = registry.load(card.version)
    assert stored_card == card
    model = PatchModel.from_safetensors(stored_card, weights, device="cpu")
    assert anomaly_map(_images(1, size=70)[0], model).shape == (70, 70)
    assert any("bank" in m for m in messages)
