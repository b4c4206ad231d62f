"""Train, calibrate and register one model version: the single entry point behind `anomap train` and retraining.

Example (a driver connected to Ray, a registry on the object store)::

    card = train_model_version(
        TrainConfig.demo(gamma=0.9), normal, abnormal, masks, calibration, registry,
        name="metal", data_digest=digest, storage=CheckpointStorage.object_store(settings),
    )
    card.version, card.thresholds.pixel, card.abnormal_patch_source      # "v2026…", 0.07, "mask"
    registry.set_live(card.version)                                        # the caller's choice

Steps: the abnormal-patch bank (γ < 1 only; a γ = 1 warm-up run first, out of the same GAN steps, when
some abnormal image has no mask that a patch overlaps enough, so its patches can be mined), the Ray Train
run, anomaly maps of the held-out calibration images, thresholds (`trainer.calibration.calibrate`), then the
card and weights into the registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from schemas import AbnormalPatchSource, ModelCard, Thresholds
from schemas.model_card import MapMode
from trainer.calibration import calibrate
from trainer.config import TrainConfig
from trainer.distributed import run_training
from trainer.gan import NoisyAnoGAN
from trainer.model_io import weights_to_bytes
from trainer.patches import abnormal_patch_bank, mask_patch_selection
from trainer.progress import ProgressWatch
from trainer.registry import ModelRegistry, new_version_id
from trainer.run_claim import claim_training_run
from trainer.run_manifest import MANIFEST_FILE, RunManifest, read_run_manifest, write_run_manifest
from trainer.scoring import DISCRIMINATOR_MAP_MODES, PatchModel, anomaly_map
from trainer.store import CheckpointStorage

Progress = Callable[[str], None]
PROVISIONAL_THRESHOLDS = Thresholds(
    pixel=1.0, image=1.0, pixel_quantile=0.5, image_quantile=0.5, n_calibration_images=1
)
"""Placeholder thresholds for a card whose model is not calibrated yet."""


def build_card(
    cfg: TrainConfig,
    name: str,
    version: str,
    source: AbnormalPatchSource,
    thresholds: Thresholds,
    data_digest: str,
    n_train: int,
    n_abnormal: int,
    parent_version: str | None = None,
    extra_config: dict[str, float | int | str | bool | None] | None = None,
    metrics: dict[str, float] | None = None,
) -> ModelCard:
    """The `ModelCard` of a model trained with ``cfg`` (architecture, method and schedule from the config)."""
    return ModelCard(
        name=name,
        version=version,
        parent_version=parent_version,
        patch_size=cfg.patch_size,
        stride=cfg.stride,
        latent_dim=cfg.latent_dim,
        base_channels=cfg.base_channels,
        spectral_norm=cfg.spectral_norm,
        gamma=cfg.gamma,
        abnormal_patch_source=source,
        smoothing_sigma=cfg.smoothing_sigma,
        line_length=cfg.line_length,
        short_segment_weight=cfg.short_segment_weight,
        blob_radius=cfg.blob_radius,
        map_mode=MapMode(cfg.map_mode),
        data_digest=data_digest,
        n_train_images=n_train,
        n_abnormal_images=n_abnormal,
        train_config=cfg.to_card_dict() | (extra_config or {}),
        thresholds=thresholds,
        metrics=metrics or {},
    )


def mining_map_mode(map_mode: str) -> MapMode:
    """The map a γ = 1 warm-up mines unmasked abnormal images by: the model's own map mode when it comes
    from the generator and encoder alone, the plain residual when it reads the discriminator (a γ = 1
    discriminator has never been shown a defect) or is signed (patches are ranked by their map's largest
    values, which must be magnitudes)."""
    mode = MapMode(map_mode)
    return MapMode.RESIDUAL if mode in DISCRIMINATOR_MAP_MODES or mode.signed else mode


def split_gan_budget(gan_steps: int, warmup_fraction: float) -> tuple[int, int]:
    """(warm-up, main) GAN steps of a run that mines abnormal patches (method.md §3 (b)): ``warmup_fraction``
    of ``gan_steps`` for the γ = 1 warm-up and the rest for the main run, both >= 1 and adding up to
    ``gan_steps``. Under 2 steps no warm-up fits: (0, ``gan_steps``), and mining falls to the starting model.
    """
    if gan_steps < 2:
        return 0, gan_steps
    warm = min(gan_steps - 1, max(1, round(gan_steps * warmup_fraction)))
    return warm, gan_steps - warm


def _mining_scorer(
    cfg: TrainConfig, state: dict[str, torch.Tensor], name: str, version: str, data_digest: str, n_train: int
) -> Callable[[np.ndarray], np.ndarray]:
    """The patch scorer that mines unmasked abnormal images: ``state`` read with `mining_map_mode`."""
    mining_cfg = cfg.replace(map_mode=str(mining_map_mode(cfg.map_mode)))
    card = build_card(
        mining_cfg, name, version, AbnormalPatchSource.NONE, PROVISIONAL_THRESHOLDS, data_digest, n_train, 0, None
    )
    return _patch_scorer(PatchModel.from_state(card, state))


def _patch_scorer(model: PatchModel, batch_size: int = 256) -> Callable[[np.ndarray], np.ndarray]:
    def score(patches: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [model.score_patches(patches[i : i + batch_size]) for i in range(0, len(patches), batch_size)]
        )

    return score


def train_model_version(
    cfg: TrainConfig,
    normal_images: Sequence[np.ndarray],
    abnormal_images: Sequence[np.ndarray],
    abnormal_masks: Sequence[np.ndarray | None],
    calibration_images: Sequence[np.ndarray],
    registry: ModelRegistry,
    name: str,
    data_digest: str,
    storage: CheckpointStorage | str,
    parent_version: str | None = None,
    progress: Progress | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    version: str | None = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
) -> ModelCard:
    """Train a model version on Ray Train, calibrate it, save it to ``registry`` and return its card.

    A run writes a `RunManifest` beside its checkpoints. ``resume=True`` continues the run of ``version``
    whose driver died (its Ray Train runs pick up their last checkpoints) and refuses, naming the
    difference, unless it is given the same data, config and parent as that run had.

    Args:
        normal_images: (H, W) uint8 or uint16 training images (may hold unlabelled defects: the noisy set).
        abnormal_images: (H, W) uint8 or uint16 confirmed abnormal images; used only when ``cfg.gamma < 1``.
        abnormal_masks: one (H, W) mask or None per abnormal image.
        calibration_images: held-out normal (H, W) images, never trained on, for the thresholds.
        registry: where the version goes (``registry.name`` must equal ``name``); not set live here.
        data_digest: identifies the training data; stored in the card.
        storage: Ray Train checkpoint storage (the object store or a local folder); each run gets a
            fresh name under it.
        parent_version: the version this one was fine-tuned from (``init_weights``), for the card.
        progress: called with one-line status messages.
        init_weights: G/D/E weights to start from (fine-tuning the live version), or None.
        version: the version id to register (default: a new one); with ``resume``, the run to continue.
        resume: continue the unfinished run of ``version`` from its checkpoints in ``storage``.
        keep_checkpoints: keep the runs' checkpoints once the version is registered (by default they are
            deleted then: the registry holds the weights, and a finished run is never resumed).
    """
    say = progress or (lambda message: None)
    if registry.name != name:
        msg = f"registry is for model {registry.name!r}, asked to train {name!r}"
        raise ValueError(msg)
    if not calibration_images:
        msg = "calibration needs at least one held-out normal image"
        raise ValueError(msg)
    if len(abnormal_images) != len(abnormal_masks):
        msg = f"{len(abnormal_images)} abnormal images but {len(abnormal_masks)} masks (use None where there is none)"
        raise ValueError(msg)
    if cfg.gamma < 1.0 and not abnormal_images:
        msg = f"gamma={cfg.gamma} < 1 needs confirmed abnormal images; pass some or train with gamma=1"
        raise ValueError(msg)
    for i, (image, mask) in enumerate(zip(abnormal_images, abnormal_masks, strict=True)):
        if mask is not None and mask.shape != image.shape:  # before any run: a warm-up would be wasted
            (height, width), (mask_height, mask_width) = image.shape, mask.shape
            msg = f"abnormal image {i} is {width}×{height} but its mask is {mask_width}×{mask_height}"
            raise ValueError(msg)
    if resume and version is None:
        msg = "resuming a training run needs the version it was training"
        raise ValueError(msg)
    version = version or new_version_id()
    storage = CheckpointStorage(storage, None, storage) if isinstance(storage, str) else storage
    manifest = RunManifest(
        name=name,
        version=version,
        data_digest=data_digest,
        n_train_images=len(normal_images),
        n_abnormal_images=len(abnormal_images) if cfg.gamma < 1.0 else 0,
        parent_version=parent_version,
        train_config=cfg.to_card_dict(),
    )
    run = manifest.run_name
    with claim_training_run(run):  # one driver per run: a resume refuses a live one
        if resume:
            _check_resumable(registry, storage, manifest)
            say(f"resuming {name}/{version} from its last checkpoints in {storage}/{run}")
        else:
            write_run_manifest(storage, run, manifest)
        started = time.monotonic()
        bank = _abnormal_bank(cfg, normal_images, abnormal_images, abnormal_masks, storage, manifest, init_weights, say)
        main_cfg, source, n_abnormal, extra = bank.main_cfg, bank.source, bank.n_images, bank.extra
        say(
            f"training {main_cfg.total_steps} steps on {main_cfg.num_workers} Ray Train workers, "
            f"checkpoints every {main_cfg.steps_per_epoch} steps to {storage}/{run}"
        )
        with ProgressWatch(say, main_cfg.total_steps) as board:
            state = run_training(
                main_cfg,
                normal_images,
                bank.patches,
                storage,
                run,
                bank.init_weights,
                progress_board=board,
            )
        train_seconds = time.monotonic() - started

        say(f"calibrating on {len(calibration_images)} held-out normal images")
        draft = build_card(
            cfg,
            name,
            version,
            source,
            PROVISIONAL_THRESHOLDS,
            data_digest,
            len(normal_images),
            n_abnormal,
            parent_version,
        )
        model = PatchModel.from_state(draft, state)
        maps = [anomaly_map(image, model) for image in calibration_images]
        thresholds = calibrate(maps, pixel_quantile=cfg.pixel_quantile, image_quantile=cfg.image_quantile)
        metrics = {
            "train_seconds": round(train_seconds, 2),
            "calibration_pixel_mean": float(np.mean([m.mean() for m in maps])),
            "calibration_image_score_mean": float(np.mean([m.max() for m in maps])),
        }
        card = build_card(
            cfg,
            name,
            version,
            source,
            thresholds,
            data_digest,
            len(normal_images),
            n_abnormal,
            parent_version,
            extra,
            metrics,
        )
        registry.save(card, weights_to_bytes(state))
        say(f"saved {name}/{version} (pixel threshold {thresholds.pixel:.4f}, image threshold {thresholds.image:.4f})")
        if not keep_checkpoints:
            _delete_runs(storage, [manifest.warmup_run_name, run], say)
    return card


def _delete_runs(storage: CheckpointStorage, run_names: Sequence[str], say: Progress) -> None:
    """Delete the folders of ``run_names`` in ``storage``; a failure is said, not raised (the version is saved)."""
    for run_name in run_names:
        try:
            storage.delete_run(run_name)
        except OSError as exc:
            say(f"could not delete the checkpoints of run {run_name} in {storage} (delete them by hand): {exc}")


@dataclass(frozen=True)
class _Bank:
    """The discriminator's abnormal patches (method.md §3), and what getting them did to the run."""

    patches: np.ndarray | None
    """(M, 2, P, P) float32: each patch and its mask; None for plain AnoGAN (γ = 1)."""
    source: AbnormalPatchSource
    n_images: int
    """The abnormal images the patches came from (0 when γ = 1)."""
    main_cfg: TrainConfig
    """The main run's config: a warm-up takes its GAN steps out of ``cfg``'s budget."""
    init_weights: dict[str, torch.Tensor] | None
    """What the main run starts from: the warm-up's weights after one, else the caller's."""
    extra: dict[str, float | int | str | bool | None]
    """For the card's ``train_config`` (``warmup_gan_steps``)."""


def _abnormal_bank(
    cfg: TrainConfig,
    normal_images: Sequence[np.ndarray],
    abnormal_images: Sequence[np.ndarray],
    abnormal_masks: Sequence[np.ndarray | None],
    storage: CheckpointStorage,
    manifest: RunManifest,
    init_weights: dict[str, torch.Tensor] | None,
    say: Progress,
) -> _Bank:
    """The abnormal-patch bank of the γ < 1 run ``manifest`` names: mask patches, or patches mined after a γ = 1
    warm-up run (``manifest.warmup_run_name``) or with the starting model, or all patches as the last resort."""
    name, version, data_digest = manifest.name, manifest.version, manifest.data_digest
    if cfg.gamma >= 1.0:
        if abnormal_images:
            say(f"gamma = 1: the {len(abnormal_images)} abnormal images are not used (plain AnoGAN)")
        return _Bank(None, AbnormalPatchSource.NONE, 0, cfg, init_weights, {})
    needs_mining = any(
        mask_patch_selection(mask, cfg.patch_size, cfg.stride, cfg.mask_min_overlap) is None for mask in abnormal_masks
    )
    score_fn = None
    main_cfg = cfg
    extra: dict[str, float | int | str | bool | None] = {}
    warm_gan, main_gan = split_gan_budget(cfg.gan_steps, cfg.warmup_fraction)
    if needs_mining and warm_gan:
        warm_cfg = cfg.replace(
            gamma=1.0,
            map_mode=str(mining_map_mode(cfg.map_mode)),
            gan_steps=warm_gan,
            encoder_steps=max(1, round(cfg.encoder_steps * cfg.warmup_fraction)),
        )
        say(f"warm-up (γ = 1, {warm_cfg.total_steps} steps) to mine abnormal patches from unmasked images")
        with ProgressWatch(lambda line: say(f"warm-up: {line}"), warm_cfg.total_steps) as board:
            init_weights = run_training(
                warm_cfg, normal_images, None, storage, manifest.warmup_run_name, init_weights, progress_board=board
            )
        score_fn = _mining_scorer(warm_cfg, init_weights, name, version, data_digest, len(normal_images))
        main_cfg = cfg.replace(gan_steps=main_gan)  # warm-up + main = cfg.gan_steps: the same GAN budget
        extra["warmup_gan_steps"] = warm_gan
    elif needs_mining and init_weights is not None:
        say(f"no warm-up in {cfg.gan_steps} GAN steps: mining the unmasked images with the starting model")
        score_fn = _mining_scorer(cfg, init_weights, name, version, data_digest, len(normal_images))
    elif needs_mining:
        say(f"no warm-up in {cfg.gan_steps} GAN steps and no starting model: all patches of unmasked images")
    patches, source = abnormal_patch_bank(
        abnormal_images,
        abnormal_masks,
        cfg.patch_size,
        cfg.stride,
        score_fn=score_fn,
        top_k=cfg.mined_patches_per_image,
        min_overlap=cfg.mask_min_overlap,
        with_masks=True,  # (M, 2, P, P): a dense discriminator calls only the masked cells fake
        detrend=cfg.detrend,
    )
    say(f"abnormal-patch bank: {len(patches)} patches from {len(abnormal_images)} images (source: {source})")
    return _Bank(patches, source, len(abnormal_images), main_cfg, init_weights, extra)


def _check_resumable(registry: ModelRegistry, storage: CheckpointStorage, manifest: RunManifest) -> None:
    """Raise ValueError, saying why, unless ``manifest``'s run can be resumed: it is not registered yet, its
    manifest is in ``storage``, and that manifest matches ``manifest`` (same data, config and parent)."""
    label = f"{manifest.name}/{manifest.version}"
    if manifest.version in registry.versions():
        msg = f"model version {label} is already trained and registered: there is nothing to resume"
        raise ValueError(msg)
    run_name = manifest.run_name
    earlier = read_run_manifest(storage, run_name)
    if earlier is None:
        msg = f"no training run of {label} in {storage} (no {storage}/{run_name}/{MANIFEST_FILE}): nothing to resume"
        raise ValueError(msg)
    differences = earlier.differences(manifest)
    if differences:
        msg = f"the run of {label} started with other data or options; resume it with the same ones: " + "; ".join(
            differences
        )
        raise ValueError(msg)


def untrained_model(
    cfg: TrainConfig, calibration_images: Sequence[np.ndarray], name: str, data_digest: str = "untrained"
) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Seeded initial weights of ``cfg``'s architecture and a card with thresholds calibrated on them.

    Its maps mean nothing, but it costs what a trained model costs to run: benchmarks of the serving
    path and tests of the plumbing use it instead of waiting for a training run.
    """
    state = NoisyAnoGAN(cfg, device="cpu").weights()
    draft = build_card(
        cfg, name, new_version_id(), AbnormalPatchSource.NONE, PROVISIONAL_THRESHOLDS, data_digest, 0, 0, None
    )
    model = PatchModel.from_state(draft, state, device="cpu")
    maps = [anomaly_map(image, model) for image in calibration_images]
    thresholds = calibrate(maps, pixel_quantile=cfg.pixel_quantile, image_quantile=cfg.image_quantile)
    return draft.model_copy(update={"thresholds": thresholds}), state


def initial_model_version(
    registry: ModelRegistry, cfg: TrainConfig, calibration_images: Sequence[np.ndarray], data_digest: str = "untrained"
) -> ModelCard:
    """Register an `untrained_model` version in ``registry`` and return its card."""
    card, state = untrained_model(cfg, calibration_images, registry.name, data_digest)
    registry.save(card, weights_to_bytes(state))
    return card
