"""``anomap train``: a model version from data, trained on Ray Train, calibrated, registered and made live.

anomap train --synthetic [--size 1024 --contamination 0.1 --abnormal-k 4] [--gamma 0.9] [--workers 2] [--gpu]
anomap train --data DIR [--gamma 0.9] [--detrend-axis auto|x|y|xy]     # DIR in the method.md §7 layout
anomap train <the same options> --resume VERSION     # after the command that trained VERSION died

Training runs on Ray Train (`trainer.pipeline`), so it needs the object store and Ray, and Redis to make the
new version live (not with --no-live). Its metrics on a test folder: ``anomap eval`` (`cluster.cli_eval`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cluster.cli_common import checked_version, console, fail, load_folder, resolved_settings
from schemas import StreamNames

if TYPE_CHECKING:
    from schemas import Settings
    from trainer.registry import ModelRegistry


def train(
    synthetic: Annotated[
        bool | None, typer.Option("--synthetic/--no-synthetic", help="Train on generated brushed metal (default).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Train on a dataset folder (method.md §7 layout) instead of --synthetic.")
    ] = None,
    size: Annotated[int, typer.Option(help="Synthetic image size (pixels).")] = 1024,
    n_train: Annotated[int, typer.Option(help="Synthetic 'normal' training images.")] = 24,
    contamination: Annotated[float, typer.Option(help="Share of 'normal' images with unlabelled scratches.")] = 0.1,
    abnormal_k: Annotated[
        int, typer.Option(help="Synthetic confirmed abnormal images given to the discriminator.")
    ] = 4,
    gamma: Annotated[float, typer.Option(help="Noisy-AnoGAN γ in (0, 1]; 1 is plain AnoGAN.")] = 0.9,
    schedule: Annotated[
        str, typer.Option(help="Training schedule: demo, wide (2× the width: better maps, ~2.3× the time) or tiny.")
    ] = "demo",
    workers: Annotated[
        int | None, typer.Option(min=1, max=256, help="Ray Train workers (default: the schedule's, 2).")
    ] = None,
    gpu: Annotated[bool, typer.Option("--gpu/--no-gpu", help="One GPU per Ray Train worker.")] = False,
    map_mode: Annotated[
        str | None,
        typer.Option(
            help="What the anomaly map measures (schemas.MapMode; default: the schedule's, signed_residual, "
            "which the line filter averages before taking its magnitude; ssim_residual was the default before)."
        ),
    ] = None,
    refine_steps: Annotated[
        int | None,
        typer.Option(
            help="Latent refinement steps from E(x) every time this model scores (default 0). 5 come within "
            "0.015 pixel AUROC of the paper's latent search at ~90x its speed, and cost ~7x the encoder alone."
        ),
    ] = None,
    line_length: Annotated[
        int | None,
        typer.Option(
            help="Finish each map with the line filter: every pixel's largest mean along a segment this many "
            "pixels long (default: the schedule's, 15). 0 = a Gaussian blur instead (σ 2 unless --smoothing-sigma)."
        ),
    ] = None,
    smoothing_sigma: Annotated[
        float | None,
        typer.Option(
            help="Gaussian σ (pixels) of each map's finish: before the line filter, or after it on a "
            "signed_residual map (default: the schedule's, 0.7)."
        ),
    ] = None,
    short_segment_weight: Annotated[
        float | None,
        typer.Option(
            help="The line filter also takes half-length segments, at this weight (default: the schedule's, 0.6; "
            "0 = off): they keep a scratch whose residual comes and goes along it."
        ),
    ] = None,
    blob_radius: Annotated[
        int | None,
        typer.Option(
            help="The line filter also takes each pixel's mean over a disc this many pixels wide (default: the "
            "schedule's, 3; 0 = off): round spots keep their depth."
        ),
    ] = None,
    detrend_sigma: Annotated[
        float | None,
        typer.Option(
            help="Subtract each image's blur of this many pixels along the grain before the networks see it "
            "(default: the schedule's, 12; 0 = off). Removes the streaks a patch GAN cannot reproduce."
        ),
    ] = None,
    detrend_axis: Annotated[
        str,
        typer.Option(
            help="The grain's direction: auto (measured on the training images; no grain found = no "
            "flattening), x (along rows), y, or xy (an isotropic blur)."
        ),
    ] = "auto",
    gan_steps: Annotated[int | None, typer.Option(help="GAN steps (default: the schedule's).")] = None,
    encoder_steps: Annotated[
        int | None, typer.Option(help="Encoder steps after the GAN (default: the schedule's).")
    ] = None,
    steps_per_epoch: Annotated[
        int | None, typer.Option(help="Steps between checkpoints (default: the schedule's).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    live: Annotated[bool, typer.Option(help="Make the new version live.")] = True,
    storage_path: Annotated[
        Path | None,
        typer.Option(
            help="Keep Ray Train checkpoints in this directory (shared by all nodes) instead of the "
            "object store's s3://<bucket>/train-runs/."
        ),
    ] = None,
    keep_checkpoints: Annotated[
        bool,
        typer.Option(
            "--keep-checkpoints", help="Keep the run's checkpoints once the version is registered (default: deleted)."
        ),
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            metavar="VERSION",
            help="Continue the run of this model version from its last checkpoints, after the command that "
            "started it died. Give the same data and options (checked).",
        ),
    ] = None,
) -> None:
    """Train a Noisy-AnoGAN model version on Ray Train and store it in the registry.

    Ray Train checkpoints every epoch (weights, Adam states, RNG seed) to s3://<bucket>/train-runs/<run>/
    (or --storage-path DIR) and resumes from the last one when a worker dies. When this command dies, run it
    again with --resume VERSION (the version it logged first) to continue from there. Once the version is
    registered the run's checkpoints are deleted (--keep-checkpoints keeps them).

    Data: --synthetic (the default; --size, --n-train, --contamination, --abnormal-k apply) or
    --data DIR, a folder in the MVTec-like layout (train/good, optional train/abnormal with masks
    in ground_truth/train_abnormal, optional calibration/good; else 10 % of train/good is held out).
    """
    if data is not None and synthetic:
        fail("give exactly one of --synthetic or --data DIR, not both")
    if data is None and synthetic is False:
        fail("give exactly one of --synthetic or --data DIR (--no-synthetic needs --data DIR)")
    if not 0 < gamma <= 1:
        fail(f"--gamma must be in (0, 1], got {gamma}")
    if not 0 <= contamination < 1:
        fail(f"--contamination must be in [0, 1), got {contamination}")
    if refine_steps is not None and refine_steps < 0:
        fail(f"--refine-steps must be >= 0, got {refine_steps}")
    if data is None:  # the synthetic data's counts; a folder brings its own images
        if n_train < 1:
            fail(f"--n-train must be >= 1 (the normal images to train on), got {n_train}")
        if abnormal_k < 0:
            fail(f"--abnormal-k must be >= 0, got {abnormal_k}")
    from trainer.config import TrainConfig, map_finish_overrides
    from trainer.detrend import DetrendAxis

    axes = ["auto", *DetrendAxis]  # auto: trainer.grain measures it on the training images
    if detrend_axis not in axes:
        fail(f"--detrend-axis must be one of {', '.join(axes)}, got {detrend_axis!r}")

    schedules = {"demo": TrainConfig.demo, "wide": TrainConfig.wide, "tiny": TrainConfig.tiny}
    if schedule not in schedules:
        fail(f"--schedule must be one of {sorted(schedules)}, got {schedule!r}")
    overrides: dict[str, object] = {"use_gpu": gpu} if workers is None else {"use_gpu": gpu, "num_workers": workers}
    if map_mode is not None:
        overrides["map_mode"] = map_mode
    if refine_steps is not None:
        overrides["refine_steps"] = refine_steps
    if detrend_sigma is not None:
        overrides["detrend_sigma"] = detrend_sigma
    overrides |= map_finish_overrides(line_length, smoothing_sigma, short_segment_weight, blob_radius)
    if detrend_axis != "auto":
        overrides["detrend_axis"] = detrend_axis
    steps = {"gan_steps": gan_steps, "encoder_steps": encoder_steps, "steps_per_epoch": steps_per_epoch}
    overrides |= {key: value for key, value in steps.items() if value is not None}
    if resume is not None:
        checked_version(resume, "--resume")
    try:
        config = schedules[schedule](gamma=gamma, seed=seed, **overrides)
    except ValueError as exc:
        fail(str(exc))
    folder = load_folder(data, "train") if data is not None else None
    if folder is not None:
        if gamma < 1 and not folder.abnormal:
            fail(f"--gamma {gamma} < 1 needs confirmed abnormal images in {data}/train/abnormal; add some or use 1")
        if folder.min_side < config.patch_size:
            fail(f"{data} has an image {folder.min_side} px on a side; training needs >= {config.patch_size} px")
    elif gamma < 1 and abnormal_k < 1:
        fail(f"--gamma {gamma} < 1 needs confirmed abnormal images: give --abnormal-k >= 1, or use --gamma 1")
    elif size < config.patch_size:
        fail(f"--size {size} is smaller than one {config.patch_size} px patch; give --size >= {config.patch_size}")
    settings = resolved_settings(redis=live, s3=True, ray=True)  # Redis only to make it live
    if live:  # the model is made live through Redis after training: find out now whether that can work
        import redis

        from cluster.connections import redis_client

        try:
            redis_client(settings).ping()
        except redis.RedisError as exc:
            fail(f"cannot reach Redis to make the model live after training ({exc}); fix it, or pass --no-live")
    from ray.train import TrainingFailedError

    from cluster.connections import connect_ray, object_store
    from trainer.distributed import describe_training_failure
    from trainer.grain import with_grain
    from trainer.pipeline import train_model_version
    from trainer.registry import ModelRegistry, new_version_id
    from trainer.run_claim import RunTaken
    from trainer.store import CheckpointStorage
    from trainer.synthetic import make_dataset

    if folder is not None:
        normal, abnormal, masks, calibration = (
            folder.train_normal,
            folder.abnormal,
            folder.abnormal_masks,
            folder.calibration,
        )
        digest = folder.data_digest
    else:
        try:
            with console.status("generating data…"):
                synth = make_dataset(
                    size=size, n_train=n_train, contamination=contamination, n_abnormal=abnormal_k, seed=seed
                )
        except ValueError as exc:
            fail(f"cannot generate the synthetic data: {exc}")
        normal, abnormal, calibration = synth.train_normal, synth.abnormal, synth.calibration
        masks = list(synth.abnormal_masks)
        digest = synth.digest()
    if detrend_axis == "auto":
        try:
            config, grain = with_grain(config, normal)
        except ValueError as exc:
            fail(f"cannot measure the training images' grain: {exc}")
        if grain is not None:
            action = f"flattening {config.detrend_sigma:g} px along {grain.axis}" if grain.axis else "not flattening"
            console.log(f"{grain.describe()}: {action}")
    connect_ray(settings)
    registry = ModelRegistry(object_store(settings), settings.model_name)
    storage = CheckpointStorage.local(storage_path) if storage_path else CheckpointStorage.object_store(settings)
    version = resume or new_version_id()
    if resume is None:
        console.log(f"model version {version}: if this command dies, run it again with --resume {version}")
    try:
        card = train_model_version(
            config,
            normal,
            abnormal,
            masks,
            calibration,
            registry=registry,
            name=settings.model_name,
            data_digest=digest,
            storage=storage,
            progress=console.log,
            version=version,
            resume=resume is not None,
            keep_checkpoints=keep_checkpoints,
        )
    except ValueError as exc:  # data or settings the run cannot use, or a run that cannot be resumed (named)
        fail(f"training failed: {exc}")
    except OSError as exc:  # the run's manifest could not be written or read
        fail(f"training failed: cannot reach the checkpoint storage {storage}: {exc}")
    except RunTaken as exc:  # --resume while the process that trains the version still runs
        fail(str(exc))
    except TrainingFailedError as exc:  # the run gave up: a worker group failed more than max_failures times
        fail(
            f"training of {settings.model_name}/{version} failed: {describe_training_failure(exc)}; its "
            f"checkpoints stay in {storage}: fix the cause, then run the same command with --resume {version}"
        )
    console.print_json(card.model_dump_json())  # first: the version is registered, whatever follows
    if live:
        _make_live(settings, registry, card.version)


def _make_live(settings: Settings, registry: ModelRegistry, version: str) -> None:
    """Make the trained ``version`` live on the default line and announce it; a failure is one line that says
    the version is registered and what to do."""
    import redis

    from cluster.connections import redis_client
    from workers.model_events import ModelEventNotAnnounced, PointersBusy, promote_model

    names = StreamNames(settings.stream_prefix)
    try:
        promote_model(registry, redis_client(settings), names, version, None, "trained by `anomap train`")
    except ModelEventNotAnnounced as exc:  # live, but serving hears of it only from the pointer
        fail(f"model version {version} was trained, registered and made live, but: {exc}")
    except PointersBusy as exc:
        fail(
            f"model version {version} was trained and registered but not made live: {exc}; make it live with "
            f"`anomap models promote {version}`"
        )
    except redis.RedisError as exc:  # Redis went away during training: nothing moved
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fail(
            f"model version {version} was trained and registered but not made live: Redis failed ({msg}); "
            f"make it live with `anomap models promote {version}`"
        )
