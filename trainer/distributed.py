"""Noisy-AnoGAN under Ray Train: DDP on G, D and E, checkpoints to shared storage, resume after a failure.

Each worker draws its own share of every (global) batch; gradients are all-reduced per network (gloo on
CPU, NCCL on GPU). Rank 0 reports a checkpoint every ``steps_per_epoch`` steps: one safetensors file
with the weights and the Adam states of G, D and E (tensors only), and in its metadata the step and the
RNG state. The RNG state is a derivation, not a snapshot: every worker re-seeds its sampler from
(seed, rank, epoch) at each epoch start and checkpoints fall on epoch boundaries, so (seed, world size,
step) is all a resumed run needs to draw exactly the batches and latents the uninterrupted run would
have drawn. A checkpoint whose seed or world size differs from the run's is refused.

Checkpoints go to a `CheckpointStorage`: the S3 object store (``s3://<bucket>/train-runs/<run_name>/``,
what `anomap train` and the demo use) or a local directory.

Example (a driver already connected to Ray)::

    storage = CheckpointStorage.object_store(settings)         # or CheckpointStorage.local("/tmp/runs")
    state = run_training(TrainConfig.demo(), normal_images, None, storage, "demo-001")
    state["generator.project.0.weight"].shape     # flat G/D/E weights, no "module." prefixes

Gotchas: a ``RunConfig(name, storage_path)`` that already holds checkpoints is *resumed*, so use a
fresh ``run_name`` per run; every worker must call ``ray.train.report`` equally often (it is a barrier).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.config import TrainConfig
from trainer.gan import NoisyAnoGAN, PatchSampler, run_schedule
from trainer.model_io import NETWORK_PREFIXES, weights_from_bytes, weights_to_bytes
from trainer.store import CheckpointStorage

CHECKPOINT_FILE = "state.safetensors"
_STEP_KEY = "step"
_RESUMED_KEY = "resumed_from"
_SEED_KEY = "rng_seed"
_WORLD_KEY = "rng_world_size"
_RNG_KEY = "rng"
RNG_SCHEME = "numpy+torch re-seeded from (seed, rank, epoch) at each epoch start"
"""What a checkpoint's ``rng`` metadata says: how the samplers' state follows from seed, rank and step."""


def rng_metadata(seed: int, world_size: int) -> dict[str, str]:
    """The RNG state of a checkpoint taken at an epoch boundary, as safetensors metadata."""
    return {_RNG_KEY: RNG_SCHEME, _SEED_KEY: str(seed), _WORLD_KEY: str(world_size)}


def check_rng_metadata(metadata: dict[str, str], seed: int, world_size: int) -> None:
    """Refuse to resume from a checkpoint whose randomness would not line up with this run's.

    Checkpoints written before the RNG state was recorded (no ``rng`` key) are accepted as they are.
    """
    if _RNG_KEY not in metadata:
        return
    theirs = (int(metadata.get(_SEED_KEY, "-1")), int(metadata.get(_WORLD_KEY, "-1")))
    if metadata[_RNG_KEY] != RNG_SCHEME or theirs != (seed, world_size):
        msg = (
            f"checkpoint at step {metadata.get(_STEP_KEY)} was taken with seed {theirs[0]} on {theirs[1]} workers "
            f"({metadata[_RNG_KEY]!r}); this run has seed {seed} on {world_size} workers: use a fresh run name"
        )
        raise ValueError(msg)


def save_checkpoint_dir(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    step: int,
    resumed_from: int | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write a checkpoint directory: ``state.safetensors`` (tensors) with ``step`` in its metadata.

    ``resumed_from``: the step this worker group started at, when it resumed from a checkpoint.
    ``extra_metadata``: more string metadata (`rng_metadata`).
    """
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    metadata = {**(extra_metadata or {}), _STEP_KEY: str(step)}
    if resumed_from is not None:
        metadata[_RESUMED_KEY] = str(resumed_from)
    save_file(tensors, str(Path(path) / CHECKPOINT_FILE), metadata=metadata)


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a checkpoint directory (``step``, and ``resumed_from`` after a resume)."""
    with safe_open(str(Path(path) / CHECKPOINT_FILE), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_checkpoint_dir(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int]:
    """Read a checkpoint directory written by `save_checkpoint_dir` -> (state, step)."""
    file = Path(path) / CHECKPOINT_FILE
    if not file.is_file():
        msg = f"checkpoint directory {path} has no {CHECKPOINT_FILE}"
        raise FileNotFoundError(msg)
    step = int(checkpoint_metadata(path).get(_STEP_KEY, "-1"))
    if step < 0:
        msg = f"checkpoint {file} carries no step in its metadata"
        raise ValueError(msg)
    return load_file(str(file)), step


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"train_config": TrainConfig.to_card_dict(), "data": ObjectRef}``.

    The data object is ``{"normal": list[(H, W) uint8 | uint16], "abnormal": (M, P, P) or (M, 2, P, P) float32 | None,
    "init_weights": safetensors bytes | None}``; a (M, 2, P, P) bank carries each patch's mask as channel 1.
    """
    cfg = TrainConfig.from_dict(config["train_config"])
    data = ray.get(config["data"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()

    model = NoisyAnoGAN(cfg, device)
    start_step = 0
    resumed_from = None
    rng_state = rng_metadata(cfg.seed, context.get_world_size())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resuming after a failure (or a re-used run name)
        with checkpoint.as_directory() as ckpt_dir:
            check_rng_metadata(checkpoint_metadata(ckpt_dir), cfg.seed, context.get_world_size())
            state, start_step = load_checkpoint_dir(ckpt_dir)
        model.load_training_state(state)  # weights and Adam moments; the samplers re-seed at start_step
        resumed_from = start_step
    elif data.get("init_weights") is not None:  # fine-tuning from a previous model version
        model.load_weights(weights_from_bytes(data["init_weights"]))

    # DDP on each network; the optimisers keep pointing at the same parameter tensors
    model.generator = ray.train.torch.prepare_model(model.generator, move_to_device=False)
    model.discriminator = ray.train.torch.prepare_model(model.discriminator, move_to_device=False)
    model.encoder = ray.train.torch.prepare_model(model.encoder, move_to_device=False)

    sampler = PatchSampler(data["normal"], data.get("abnormal"), cfg, rank=rank, device=device)
    board = config.get("progress_board")
    if board is not None and rank == 0:  # fire-and-forget: the driver learns of restarts
        board.started.remote(resumed_from)

    def report(step: int, metrics: dict[str, float]) -> None:
        phase = "gan" if step <= cfg.gan_steps else "encoder"
        payload = {"step": step, "phase": phase, "resumed_from": resumed_from, **metrics}
        if rank != 0:
            ray.train.report(payload)  # every worker reports: it is a barrier
            return
        if board is not None:  # fire-and-forget: progress for the driver
            board.update.remote(step, cfg.total_steps, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint_dir(tmp, model.training_state(), step, resumed_from, rng_state)
            ray.train.report(payload, checkpoint=Checkpoint.from_directory(tmp))

    if start_step >= cfg.total_steps:
        return
    run_schedule(model, sampler, start_step, report)


def describe_training_failure(exc: BaseException) -> str:
    """One line on why a Ray Train run failed for good: each failed rank's error (a `WorkerGroupError`; ranks
    that failed alike are named together), the controller's (a `ControllerError`), else ``exc``'s first line.

        >>> describe_training_failure(WorkerGroupError("…", {0: ValueError("bad"), 1: ValueError("bad")}))
        'rank 0, 1: ValueError: bad'
    """
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        ranks_by_error: dict[str, list[str]] = {}
        for rank, error in sorted(failures.items()):
            text = str(error).strip().splitlines()
            ranks_by_error.setdefault(f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": "), []).append(
                str(rank)
            )
        return "; ".join(f"rank {', '.join(ranks)}: {error}" for error, ranks in ranks_by_error.items())
    cause = getattr(exc, "controller_failure", None)
    if isinstance(cause, BaseException):
        return f"the Ray Train controller failed: {type(cause).__name__}: {cause}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _network_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if key.split(".", 1)[0] in NETWORK_PREFIXES}


def run_training(
    cfg: TrainConfig,
    normal_images: Sequence[np.ndarray],
    abnormal_patches: np.ndarray | None,
    storage: CheckpointStorage | str,
    run_name: str,
    init_weights: dict[str, torch.Tensor] | None = None,
    progress_board: Any = None,
) -> dict[str, torch.Tensor]:
    """Train G, D, E with a Ray Train `TorchTrainer` and return their final weights.

    Args:
        cfg: the hyper-parameters (``num_workers``, ``use_gpu``, ``cpus_per_worker`` size the run).
        normal_images: (H, W) uint8 or uint16 training images (each at least P×P).
        abnormal_patches: (M, P, P) float32 in [0, 1] for the discriminator (used when γ < 1), or
            (M, 2, P, P) with each patch's mask as channel 1, or None.
        storage: shared storage for checkpoints: a `CheckpointStorage` (the S3 store or a local folder),
            or a local path or URI Ray Train understands; the run writes to ``<storage>/<run_name>/``.
        run_name: unique per run; an existing run of that name is resumed from its last checkpoint.
        init_weights: G/D/E weights to fine-tune from (ignored when resuming from a checkpoint).
        progress_board: a `trainer.progress.ProgressBoard` actor that rank 0 posts each checkpoint's step to.

    Returns:
        ``{"generator.…": Tensor, "discriminator.…": Tensor, "encoder.…": Tensor}`` on CPU.
    """
    if not ray.is_initialized():
        msg = "run_training needs a Ray connection: call ray.init(...) (or start the anomap stack) first"
        raise RuntimeError(msg)
    if not normal_images:
        msg = "run_training needs at least one normal image"
        raise ValueError(msg)
    p = cfg.patch_size
    for i, image in enumerate(normal_images):
        if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16) or min(image.shape) < p:
            msg = f"normal image {i} must be (H, W) uint8 or uint16 with H, W >= {p}; got {image.shape} {image.dtype}"
            raise ValueError(msg)
    if cfg.gamma < 1.0 and (abnormal_patches is None or len(abnormal_patches) == 0):
        msg = f"gamma={cfg.gamma} < 1 needs abnormal patches (method.md §2); pass some or use gamma=1"
        raise ValueError(msg)
    data = {
        "normal": [np.ascontiguousarray(image) for image in normal_images],
        "abnormal": None if abnormal_patches is None else np.ascontiguousarray(abnormal_patches, dtype=np.float32),
        "init_weights": None if init_weights is None else weights_to_bytes(_network_weights(init_weights)),
    }
    if isinstance(storage, str):
        storage = CheckpointStorage(storage, None, storage)
    data_ref = ray.put(data)
    resources = None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train_config": cfg.to_card_dict(), "data": data_ref, "progress_board": progress_board},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()  # Ray Train 2 raises TrainingFailedError when the run fails for good
    if result.checkpoint is None:
        msg = f"training run {run_name!r} finished without a checkpoint (storage {storage})"
        raise RuntimeError(msg)
    with result.checkpoint.as_directory() as ckpt_dir:
        state, step = load_checkpoint_dir(ckpt_dir)
    if step != cfg.total_steps:
        msg = f"training run {run_name!r} ended at step {step}, expected {cfg.total_steps}"
        raise RuntimeError(msg)
    return _network_weights(state)
