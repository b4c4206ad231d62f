"""`train_model_version`'s plan before Ray Train: which runs it asks for, with which GAN steps, and the bank's source.

Ray Train itself is replaced by a recorder (`run_training` returns seeded initial weights), so these run in seconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trainer.pipeline as pipeline
from schemas import AbnormalPatchSource, ModelCard
from trainer.config import TrainConfig
from trainer.gan import NoisyAnoGAN
from trainer.pipeline import split_gan_budget, train_model_version
from trainer.run_manifest import MANIFEST_FILE, list_runs, read_run_manifest
from trainer.store import CheckpointStorage


@dataclass
class _Run:
    cfg: TrainConfig
    bank: np.ndarray | None
    init_weights: dict[str, torch.Tensor] | None
    run_name: str


@dataclass
class _Registry:
    name: str = "metal"
    saved: list[ModelCard] = field(default_factory=list)

    def save(self, card: ModelCard, weights: bytes) -> str:
        self.saved.append(card)
        return card.version

    def versions(self) -> list[str]:
        return [card.version for card in self.saved]


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[_Run]:
    """Every `run_training` call of the test, in order; each returns its config's seeded initial weights."""
    recorded: list[_Run] = []

    def fake_run_training(
        cfg: TrainConfig,
        normal_images: Sequence[np.ndarray],
        abnormal_patches: np.ndarray | None,
        storage: Any,
        run_name: str,
        init_weights: dict[str, torch.Tensor] | None = None,
        progress_board: Any = None,
    ) -> dict[str, torch.Tensor]:
        recorded.append(_Run(cfg, abnormal_patches, init_weights, run_name))
        return NoisyAnoGAN(cfg, device="cpu").weights()

    @contextlib.contextmanager
    def no_board(progress: Any, total_steps: int) -> Iterator[None]:
        progress(f"a board of {total_steps} steps")  # what the watch would say, through the run's own channel
        yield None

    monkeypatch.setattr(pipeline, "run_training", fake_run_training)
    monkeypatch.setattr(pipeline, "claim_training_run", lambda run_name: contextlib.nullcontext())  # needs Ray
    monkeypatch.setattr(pipeline, "ProgressWatch", no_board)
    return recorded


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(90, 110, size=(64, 64), dtype=np.uint8)


@pytest.fixture
def storage(tmp_path: Path) -> CheckpointStorage:
    """Where the runs' manifests go (the recorder writes no checkpoints)."""
    return CheckpointStorage.local(tmp_path / "runs")


def _train(
    cfg: TrainConfig,
    masks: list[np.ndarray | None],
    storage: CheckpointStorage,
    init_weights: dict[str, torch.Tensor] | None = None,
    registry: _Registry | None = None,
    **resume: Any,
) -> ModelCard:
    return train_model_version(
        cfg,
        [_image(0), _image(1)],
        [_image(2) for _ in masks],
        masks,
        [_image(3)],
        registry or _Registry(),  # type: ignore[arg-type]  # only .name, .save and .versions are used
        name="metal",
        data_digest="test",
        storage=storage,
        init_weights=init_weights,
        **resume,
    )


def _scratch() -> np.ndarray:
    mask = np.zeros((64, 64), dtype=bool)
    mask[40, 40] = True  # a 1-px scratch
    return mask


def test_a_mask_no_patch_overlaps_enough_is_mined_after_a_warm_up_not_taken_whole(
    runs: list[_Run], storage: CheckpointStorage
) -> None:
    cfg = TrainConfig.tiny(gamma=0.9, mask_min_overlap=2, gan_steps=4, mined_patches_per_image=3)
    card = _train(cfg, [_scratch()], storage)
    warm, main = runs
    assert (warm.cfg.gamma, warm.cfg.gan_steps, warm.bank) == (1.0, 1, None)
    assert main.cfg.gan_steps == 3 and main.bank is not None and len(main.bank) == 3
    assert card.abnormal_patch_source == AbnormalPatchSource.MINED
    assert card.train_config["warmup_gan_steps"] == 1


def test_a_mask_a_patch_overlaps_enough_needs_no_warm_up(runs: list[_Run], storage: CheckpointStorage) -> None:
    card = _train(TrainConfig.tiny(gamma=0.9, mask_min_overlap=1, gan_steps=4), [_scratch()], storage)
    (main,) = runs
    assert main.cfg.gan_steps == 4 and main.bank is not None and len(main.bank) == 4
    assert card.abnormal_patch_source == AbnormalPatchSource.MASK


@pytest.mark.parametrize("gan_steps", [0, 1, 2, 3, 4, 7, 3000])
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.99])
def test_the_warm_up_comes_out_of_the_gan_budget(gan_steps: int, fraction: float) -> None:
    warm, main = split_gan_budget(gan_steps, fraction)
    assert warm + main == gan_steps
    if gan_steps < 2:
        assert warm == 0  # no room for a warm-up and a main run of >= 1 step each
    else:
        assert warm >= 1 and main >= 1


def test_an_encoder_only_fine_tune_leaves_the_gan_alone_and_mines_with_its_parent(
    runs: list[_Run], storage: CheckpointStorage
) -> None:
    cfg = TrainConfig.tiny(gamma=0.9, gan_steps=0, encoder_steps=2, mined_patches_per_image=2)
    parent = NoisyAnoGAN(cfg, device="cpu").weights()
    card = _train(cfg, [None], storage, init_weights=parent)
    (main,) = runs  # no warm-up run: it would change G and D
    assert main.cfg.gan_steps == 0 and main.init_weights is parent
    assert main.bank is not None and len(main.bank) == 2
    assert card.abnormal_patch_source == AbnormalPatchSource.MINED
    assert "warmup_gan_steps" not in card.train_config


def test_one_gan_step_from_scratch_keeps_its_budget_and_takes_all_patches(
    runs: list[_Run], storage: CheckpointStorage
) -> None:
    card = _train(TrainConfig.tiny(gamma=0.9, gan_steps=1), [None], storage)
    (main,) = runs
    assert main.cfg.gan_steps == 1 and main.init_weights is None
    assert main.bank is not None and len(main.bank) == 9  # every patch of the 3 × 3 grid: the last resort
    assert card.abnormal_patch_source == AbnormalPatchSource.ALL


def test_a_mask_of_another_size_is_refused_before_any_run(runs: list[_Run], storage: CheckpointStorage) -> None:
    cfg = TrainConfig.tiny(gamma=0.9, gan_steps=4)
    with pytest.raises(ValueError, match="abnormal image 1 is 64×64 but its mask is 32×64"):
        _train(cfg, [None, np.zeros((64, 32), dtype=bool)], storage)  # the first one, unmasked, would need a warm-up
    assert runs == []


def test_a_run_resumes_under_its_own_version_and_run_names(runs: list[_Run], storage: CheckpointStorage) -> None:
    """A run whose driver died (here: one that never registered) is resumed under its version: the same Ray Train
    run names, so each run picks up its last checkpoint, and the version registered is the one it was training."""
    cfg = TrainConfig.tiny(gamma=0.9, mask_min_overlap=2, gan_steps=4, mined_patches_per_image=3)
    _train(cfg, [_scratch()], storage, version="v20261202-090000-000001", keep_checkpoints=True)
    manifest = read_run_manifest(storage, "metal-v20261202-090000-000001")
    assert manifest is not None and manifest.train_config["gamma"] == 0.9 and manifest.n_abnormal_images == 1
    first = [run.run_name for run in runs]
    assert first == ["metal-v20261202-090000-000001-warmup", "metal-v20261202-090000-000001"]
    card = _train(cfg, [_scratch()], storage, version="v20261202-090000-000001", resume=True)
    assert card.version == "v20261202-090000-000001"
    assert [run.run_name for run in runs[2:]] == first


def test_a_resume_with_other_options_or_no_run_is_refused_before_any_run(
    runs: list[_Run], storage: CheckpointStorage
) -> None:
    cfg = TrainConfig.tiny(gamma=0.9, mask_min_overlap=1, gan_steps=4)
    registry = _Registry()
    card = _train(cfg, [_scratch()], storage, registry=registry, keep_checkpoints=True)
    assert (Path(storage.run_path(f"metal-{card.version}")) / MANIFEST_FILE).is_file()
    runs.clear()
    with pytest.raises(ValueError, match="already trained and registered"):
        _train(cfg, [_scratch()], storage, registry=registry, version=card.version, resume=True)
    with pytest.raises(ValueError, match=r"train_config\.gamma: 0\.9 when the run started, 0\.8 now"):
        _train(cfg.replace(gamma=0.8), [_scratch()], storage, version=card.version, resume=True)
    with pytest.raises(ValueError, match=r"n_abnormal_images: 1 when the run started, 2 now"):
        _train(cfg, [_scratch(), _scratch()], storage, version=card.version, resume=True)
    with pytest.raises(ValueError, match=r"no training run of metal/v20260101-000000-000000 in .*nothing to resume"):
        _train(cfg, [_scratch()], storage, version="v20260101-000000-000000", resume=True)
    with pytest.raises(ValueError, match="needs the version"):
        _train(cfg, [_scratch()], storage, resume=True)
    assert runs == []


def test_a_registered_versions_runs_are_deleted_unless_kept(runs: list[_Run], storage: CheckpointStorage) -> None:
    cfg = TrainConfig.tiny(gamma=0.9, mask_min_overlap=2, gan_steps=4, mined_patches_per_image=3)  # with a warm-up
    for run_name in ("metal-v1", "metal-v1-warmup", "metal-v2"):  # what Ray Train would have left
        (Path(storage.run_path(run_name)) / "checkpoint_000").mkdir(parents=True)
    _train(cfg, [_scratch()], storage, version="v1")
    assert [run.run_name for run in runs] == ["metal-v1-warmup", "metal-v1"]
    assert sorted(p.name for p in Path(storage.path).iterdir()) == ["metal-v2"], "only this version's runs go"
    _train(cfg, [_scratch()], storage, version="v3", keep_checkpoints=True)
    assert (Path(storage.run_path("metal-v3")) / MANIFEST_FILE).is_file()


def test_the_warm_ups_progress_is_reported_and_named_as_the_warm_ups(
    runs: list[_Run], storage: CheckpointStorage
) -> None:
    cfg = TrainConfig.tiny(gamma=0.9, mask_min_overlap=2, gan_steps=4, mined_patches_per_image=3)  # with a warm-up
    said: list[str] = []
    _train(cfg, [_scratch()], storage, version="v1", progress=said.append)
    warm, main = runs[0].cfg.total_steps, runs[1].cfg.total_steps
    boards = [line for line in said if "a board of" in line]
    assert boards == [f"warm-up: a board of {warm} steps", f"a board of {main} steps"]


def test_a_file_in_a_manifests_place_that_is_not_one_is_named(storage: CheckpointStorage) -> None:
    folder = Path(storage.run_path("metal-v1"))
    folder.mkdir(parents=True)
    (folder / MANIFEST_FILE).write_text('{"name": "metal"}')
    with pytest.raises(ValueError, match=r"metal-v1/anomap-run\.json is not an anomap run manifest: Field required"):
        read_run_manifest(storage, "metal-v1")
    assert read_run_manifest(storage, "metal-v2") is None


def test_the_runs_listed_are_this_models_with_a_manifest(runs: list[_Run], storage: CheckpointStorage) -> None:
    assert list_runs(storage, "metal") == []  # no folder yet
    cfg = TrainConfig.tiny(gamma=0.9, mask_min_overlap=2, gan_steps=4, mined_patches_per_image=3)
    _train(cfg, [_scratch()], storage, version="v2", keep_checkpoints=True)  # with a warm-up folder
    _train(cfg, [_scratch()], storage, version="v1", keep_checkpoints=True)
    _train(cfg, [_scratch()], storage, version="v3")  # registered: deleted
    for stray in ("other-v9", "metal-v8"):  # another model's run; a folder without a manifest
        Path(storage.run_path(stray)).mkdir(parents=True)
    (Path(storage.run_path("metal-v7")) / MANIFEST_FILE).parent.mkdir(parents=True)
    (Path(storage.run_path("metal-v7")) / MANIFEST_FILE).write_text("not json")
    assert [run.version for run in list_runs(storage, "metal")] == ["v1", "v2"]
