"""Shared by the retraining tests: a line's data folder, its live (untrained) parent, confirmed defects.

def test_x(line_registry: ModelRegistry, ...):   # the fixture: the line's data uploaded, a parent live
    confirm_squares(client, line_registry.store, range(30, 33))   # 3 confirmed dark squares
    outcome = retrain_run(client, line_registry, tmp_path, min_confirmations=3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import redis

from schemas import Box, Confirmation, ModelEvent, StreamNames
from trainer.config import TrainConfig
from trainer.imaging import encode_png
from trainer.pipeline import initial_model_version
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from trainer.synthetic import synth_image
from workers.confirmations import publish_confirmation
from workers.dataset_upload import upload_dataset_folder
from workers.model_events import read_model_events
from workers.retrain import RetrainOutcome, retrain_once
from workers.retrain_data import load_validation_set
from workers.retrain_policy import RetrainPolicy
from workers.scored_images import scored_image_key

NAMES = StreamNames()
LINE = "press-2"
SIZE = 64
SIDE = 8
PARENT_CONFIG = TrainConfig.tiny(gan_steps=8, encoder_steps=4)
FINE_TUNE = {"gan_steps": 4, "encoder_steps": 2, "num_workers": 1}  # one worker starts ~4 s sooner on 2 cores


def metal(seed: int) -> np.ndarray:
    return synth_image(seed, SIZE)[0]


def squared_defect(seed: int) -> tuple[np.ndarray, np.ndarray, Box]:
    """A metal image with a dark SIDE×SIDE square (an obvious defect), its mask and its box."""
    image = metal(seed).copy()
    x, y = 8 + seed % 40, 8 + (seed * 7) % 40
    image[y : y + SIDE, x : x + SIDE] = 12
    mask = np.zeros(image.shape, dtype=bool)
    mask[y : y + SIDE, x : x + SIDE] = True
    return image, mask, Box(x=x, y=y, width=SIDE, height=SIDE)


def write_line_folder(root: Path) -> Path:
    """A method.md §7 folder: 4 train/good, 3 test/good, 3 test/square with masks."""
    for i in range(4):
        (root / "train/good").mkdir(parents=True, exist_ok=True)
        (root / f"train/good/{i:03d}.png").write_bytes(encode_png(metal(i)))
    for i in range(3):
        (root / "test/good").mkdir(parents=True, exist_ok=True)
        (root / "test/square").mkdir(parents=True, exist_ok=True)
        (root / "ground_truth/square").mkdir(parents=True, exist_ok=True)
        (root / f"test/good/{i:03d}.png").write_bytes(encode_png(metal(10 + i)))
        image, mask, _ = squared_defect(20 + i)
        (root / f"test/square/{i:03d}.png").write_bytes(encode_png(image))
        (root / f"ground_truth/square/{i:03d}_mask.png").write_bytes(encode_png(mask))
    return root


def a_line_with_a_live_parent(object_store: ObjectStore, tmp_path: Path) -> ModelRegistry:
    """The line's data uploaded to ``object_store``, and an untrained (calibrated) parent live on the line
    (the ``line_registry`` fixture of conftest)."""
    upload_dataset_folder(object_store, write_line_folder(tmp_path / "metal"), LINE)
    registry = ModelRegistry(object_store, "metal")
    good = load_validation_set(object_store, LINE).good
    parent = initial_model_version(registry, PARENT_CONFIG, good, data_digest="parent")
    registry.promote(parent.version, LINE, reason="first")
    return registry


def confirm_squares(client: redis.Redis, store: ObjectStore, seeds: range, *, clean: bool = False) -> list[str]:
    """Keep each job's image as the consumer would and publish an abnormal confirmation with its box."""
    jobs = []
    for seed in seeds:
        image, _, box = squared_defect(seed)
        if clean:
            image = metal(seed)
        job = f"cam01-{seed}"
        store.put_bytes(scored_image_key(LINE, job), encode_png(image), "image/png")
        publish_confirmation(client, NAMES, Confirmation(job_id=job, line=LINE, label="abnormal", boxes=[box]))
        jobs.append(job)
    return jobs


def model_events_of(client: redis.Redis) -> list[ModelEvent]:
    return [event for _, event in read_model_events(client, NAMES)]


def retrain_run(client: redis.Redis, registry: ModelRegistry, tmp_path: Path, **policy: Any) -> RetrainOutcome:
    return retrain_once(client, registry, NAMES, str(tmp_path / "runs"), LINE, RetrainPolicy(**(FINE_TUNE | policy)))
