"""The ``anomap`` command line.

anomap demo                      # the whole system once, on the embedded stack
anomap stack up|down|status      # the embedded Valkey + SeaweedFS + Ray head
anomap train --synthetic         # train a model version on Ray Train and make it live
anomap train --data DIR          # ... on a dataset folder (MVTec-like layout, method.md §7)
anomap eval --data DIR           # metrics + HTML report of a version on the folder's test images
anomap serve                     # Serve app + stream consumers for the live version
anomap publish PATH...           # images (files or folders) as jobs
anomap results [--follow]        # print results
anomap status [--watch] [--json] # streams, lag, pending, consumers, dead letters, throughput, Serve, model
anomap loadgen --cameras 8 --fps 1 --duration 30   # a simulated camera fleet, open loop
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from schemas import InspectionJob, Settings, StreamNames

if TYPE_CHECKING:
    from trainer.folder_dataset import FolderDataset

app = typer.Typer(
    help="anomap: pixel-level anomaly maps for factory camera images, at fleet scale.",
    no_args_is_help=True,
    add_completion=False,
)
stack_app = typer.Typer(
    help="The embedded stack: Valkey, SeaweedFS (S3) and a Ray head on 127.0.0.1.", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")
console = Console()
err = Console(stderr=True)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_DETREND_AXES = ("auto", "x", "y", "xy")  # auto: trainer.grain measures it; the rest are trainer.detrend.DetrendAxis


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _settings() -> Settings:
    from cluster.connections import resolve_settings

    try:
        return resolve_settings()
    except ValueError as exc:
        _fail(str(exc))
        raise  # unreachable


def _require_stack(settings: Settings) -> None:
    missing = [
        name
        for name, value in (
            ("REDIS_URL", settings.redis_url),
            ("S3_ENDPOINT", settings.s3_endpoint),
            ("RAY_ADDRESS", settings.ray_address),
        )
        if value is None
    ]
    if missing:
        _fail(f"{', '.join(missing)} not set and no embedded stack is up: run `anomap stack up` first")


@stack_app.command("up")
def stack_up_cmd() -> None:
    """Start what is not configured (Valkey, `weed mini`, Ray head) and record it in the state file."""
    from cluster.stack import stack_up

    state = stack_up(Settings.from_env(), progress=console.log)
    console.print_json(state.public_json())


@stack_app.command("down")
def stack_down_cmd() -> None:
    """Stop exactly the processes `anomap stack up` started."""
    from cluster.stack import stack_down

    stopped = stack_down(Settings.from_env())
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing'}")


@stack_app.command("status")
def stack_status_cmd() -> None:
    """Show each component's endpoint, PID and whether it answers."""
    from cluster.stack import stack_status

    console.print_json(json.dumps(stack_status(Settings.from_env()), default=str))


def _load_folder(data: Path, part: str) -> FolderDataset:
    """Load a dataset folder, printing its warnings; a bad folder is a clear message and exit 2."""
    from trainer.folder_dataset import DatasetError, DatasetPart, load_dataset

    try:
        with console.status(f"loading {data}…"):
            dataset = load_dataset(data, DatasetPart(part))
    except DatasetError as exc:
        _fail(str(exc))
        raise  # unreachable
    for warning in dataset.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    console.log(f"loaded {data}: {json.dumps(dataset.summary())}")
    return dataset


@app.command()
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
            help="What the anomaly map measures (schemas.MapMode; default: the schedule's, ssim_residual; "
            "residual saves ~5 % of the CPU scoring time, with worse maps)."
        ),
    ] = None,
    refine_steps: Annotated[
        int | None,
        typer.Option(
            help="Latent refinement steps from E(x) every time this model scores (default 0). 5 come within "
            "0.015 pixel AUROC of the paper's latent search at ~90x its speed, and cost ~7x the encoder alone."
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
    seed: Annotated[int, typer.Option()] = 0,
    live: Annotated[bool, typer.Option(help="Make the new version live.")] = True,
    storage_path: Annotated[
        Path | None,
        typer.Option(
            help="Keep Ray Train checkpoints in this directory (shared by all nodes) instead of the "
            "object store's s3://<bucket>/train-runs/."
        ),
    ] = None,
) -> None:
    """Train a Noisy-AnoGAN model version on Ray Train and store it in the registry.

    Ray Train checkpoints every epoch (weights, Adam states, RNG seed) to s3://<bucket>/train-runs/<run>/
    (or --storage-path DIR) and resumes from the last one when a worker dies.

    Data: --synthetic (the default; --size, --n-train, --contamination, --abnormal-k apply) or
    --data DIR, a folder in the MVTec-like layout (train/good, optional train/abnormal with masks
    in ground_truth/train_abnormal, optional calibration/good; else 10 % of train/good is held out).
    """
    if data is not None and synthetic:
        _fail("give exactly one of --synthetic or --data DIR, not both")
    if data is None and synthetic is False:
        _fail("give exactly one of --synthetic or --data DIR (--no-synthetic needs --data DIR)")
    if not 0 < gamma <= 1:
        _fail(f"--gamma must be in (0, 1], got {gamma}")
    if not 0 <= contamination < 1:
        _fail(f"--contamination must be in [0, 1), got {contamination}")
    if refine_steps is not None and refine_steps < 0:
        _fail(f"--refine-steps must be >= 0, got {refine_steps}")
    if detrend_axis not in _DETREND_AXES:
        _fail(f"--detrend-axis must be one of {', '.join(_DETREND_AXES)}, got {detrend_axis!r}")
    from trainer.config import TrainConfig

    schedules = {"demo": TrainConfig.demo, "wide": TrainConfig.wide, "tiny": TrainConfig.tiny}
    if schedule not in schedules:
        _fail(f"--schedule must be one of {sorted(schedules)}, got {schedule!r}")
    overrides: dict[str, object] = {"use_gpu": gpu} if workers is None else {"use_gpu": gpu, "num_workers": workers}
    if map_mode is not None:
        overrides["map_mode"] = map_mode
    if refine_steps is not None:
        overrides["refine_steps"] = refine_steps
    if detrend_sigma is not None:
        overrides["detrend_sigma"] = detrend_sigma
    if detrend_axis != "auto":
        overrides["detrend_axis"] = detrend_axis
    try:
        config = schedules[schedule](gamma=gamma, seed=seed, **overrides)
    except ValueError as exc:
        _fail(str(exc))
        raise  # unreachable
    folder = _load_folder(data, "train") if data is not None else None
    if folder is not None:
        if gamma < 1 and not folder.abnormal:
            _fail(f"--gamma {gamma} < 1 needs confirmed abnormal images in {data}/train/abnormal; add some or use 1")
        if folder.min_side < config.patch_size:
            _fail(f"{data} has an image {folder.min_side} px on a side; training needs >= {config.patch_size} px")
    settings = _settings()
    _require_stack(settings)
    from cluster.connections import connect_ray, object_store
    from trainer.grain import with_grain
    from trainer.pipeline import train_model_version
    from trainer.registry import ModelRegistry
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
        with console.status("generating data…"):
            synth = make_dataset(
                size=size, n_train=n_train, contamination=contamination, n_abnormal=abnormal_k, seed=seed
            )
        normal, abnormal, calibration = synth.train_normal, synth.abnormal, synth.calibration
        masks = list(synth.abnormal_masks)
        digest = synth.digest()
    if detrend_axis == "auto":
        config, grain = with_grain(config, normal)
        if grain is not None:
            action = f"flattening {config.detrend_sigma:g} px along {grain.axis}" if grain.axis else "not flattening"
            console.log(f"{grain.describe()}: {action}")
    connect_ray(settings)
    registry = ModelRegistry(object_store(settings), settings.model_name)
    storage = CheckpointStorage.local(storage_path) if storage_path else CheckpointStorage.object_store(settings)
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
    )
    if live:
        from cluster.connections import redis_client
        from workers.model_events import promote_model

        names = StreamNames(settings.stream_prefix)
        promote_model(registry, redis_client(settings), names, card.version, None, "trained by `anomap train`")
    console.print_json(card.model_dump_json())


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Option(help="Dataset folder with test/good and test/<defect> (method.md §7).")],
    model: Annotated[str | None, typer.Option(help="Model version (default: the live one).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write metrics and counts as JSON here.")] = None,
    report: Annotated[Path | None, typer.Option(help="Folder for the HTML report (index.html + PNGs).")] = None,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if visible, else cpu).")] = None,
    score_mode: Annotated[
        str | None, typer.Option(help="encoder | search (the paper's latent search; slow). Default: the card's.")
    ] = None,
    refine_steps: Annotated[int | None, typer.Option(help="encoder mode: latent refinement steps from E(x).")] = None,
    search_steps: Annotated[int | None, typer.Option(help="search mode: Γ, Adam steps per patch (500).")] = None,
) -> None:
    """Evaluate a model version on a folder's test images: image/pixel AUROC, pixel AP, AUPRO; optional report."""
    dataset = _load_folder(data, "test")
    settings = _settings()
    if settings.s3_endpoint is None:
        _fail("S3_ENDPOINT not set and no embedded stack is up: run `anomap stack up` first")
    from cluster.connections import object_store
    from trainer.evaluation import evaluate
    from trainer.registry import ModelNotFound, ModelRegistry
    from trainer.scoring import PatchModel

    registry = ModelRegistry(object_store(settings), settings.model_name)
    try:
        version = model or registry.live_version()
        card, weights = registry.load(version)
    except ModelNotFound as exc:
        _fail(str(exc))
        raise  # unreachable
    try:
        patch_model = PatchModel.from_safetensors(
            card, weights, device=device, score_mode=score_mode, search_steps=search_steps, refine_steps=refine_steps
        )
    except (ValueError, RuntimeError) as exc:
        _fail(f"cannot load model {settings.model_name}/{version}: {exc}")
        raise  # unreachable
    console.log(f"evaluating {settings.model_name}/{version} on {len(dataset.test_images)} test images")
    result = evaluate(patch_model, dataset, progress=console.log)
    summary = {
        "model": {"name": card.name, "version": card.version},
        "data": {"root": str(data), "data_digest": dataset.data_digest, "skipped": dataset.warnings},
        **result.to_json(),
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    if report is not None:
        from cluster.eval_report import write_eval_report

        console.log(f"report: {write_eval_report(report, result, dataset, card)}")
    console.print_json(json.dumps(summary))


@app.command()
def serve(
    version: Annotated[
        str | None,
        typer.Option(
            help="Pin one model version for every line (default: each line's live version, "
            "re-read every few seconds, so `anomap models promote` swaps models without a restart)."
        ),
    ] = None,
    lines: Annotated[str, typer.Option(help="Comma-separated production lines to consume.")] = "default",
    consumers: Annotated[int, typer.Option(min=1, max=64)] = 2,
    replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=256,
            help="A fixed number of PatchScorer replicas (default: ANOMAP_SCORER_REPLICAS, or autoscaling "
            "with ANOMAP_SCORER_MIN_REPLICAS/ANOMAP_SCORER_MAX_REPLICAS; queue limits: see README).",
        ),
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Also answer POST /v1/inspect on 127.0.0.1:PORT.")
    ] = None,
) -> None:
    """Run the Serve app and stream consumers until interrupted (SIGINT/SIGTERM drain gracefully)."""
    settings = _settings()
    _require_stack(settings)
    from cluster.connections import connect_ray, object_store
    from cluster.serving import InspectionServer
    from trainer.registry import ModelNotFound, ModelRegistry
    from workers.logs import configure_logging

    registry = ModelRegistry(object_store(settings), settings.model_name)
    line_ids = tuple(line.strip() for line in lines.split(",") if line.strip())
    try:
        registry.load_card(version or registry.live_version())
        live = {line: registry.live_version(line) for line in line_ids}
    except ModelNotFound as exc:
        _fail(str(exc))
    try:
        configure_logging(logging.INFO)  # ANOMAP_LOG_FORMAT=json: one JSON object per line
    except ValueError as exc:
        _fail(str(exc))
    connect_ray(settings)
    from workers.serve_app import ServeHttpConflict

    try:
        with InspectionServer(
            settings, version, consumers=consumers, lines=line_ids, scorer_replicas=replicas, http_port=http_port
        ) as server:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: server.stop.set())
            pointers = ", ".join(f"{line}: {v}" for line, v in live.items())
            models = f"model {version} (pinned)" if version else f"live models {pointers}"
            console.log(f"serving lines {', '.join(line_ids)} with {models}; Ctrl-C drains and stops")
            server.wait()
    except ServeHttpConflict as exc:  # raised by deploy, before anything runs
        _fail(str(exc))
    console.log("drained and stopped")


def _image_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            _fail(f"{path} is neither a file nor a folder")
    return files


@app.command()
def publish(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    camera: Annotated[str, typer.Option(help="Camera id for these jobs.")] = "cam01",
    line: Annotated[str, typer.Option(help="Production line.")] = "default",
    by_reference: Annotated[bool, typer.Option(help="Upload to the object store and send s3:// refs.")] = False,
) -> None:
    """Publish images as inspection jobs; prints each job id."""
    settings = _settings()
    _require_stack(settings)
    from pydantic import ValidationError

    from cluster.connections import object_store, redis_client
    from workers.publisher import image_key, publish_job, upload_image

    files = _image_files(paths)
    if not files:
        _fail("no image files found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    client = redis_client(settings)
    names = StreamNames(settings.stream_prefix)
    store = object_store(settings) if by_reference else None
    run = uuid.uuid4().hex[:8]
    for i, file in enumerate(files):
        try:
            job = InspectionJob(job_id=f"{camera}-{run}-{i:05d}", camera_id=camera, line=line)
        except ValidationError as exc:
            _fail(f"invalid --camera or --line: {exc.errors()[0]['msg']}")
        data = file.read_bytes()
        if store is not None:
            ref = upload_image(store, image_key(job, file.suffix.lower()), data)
            entry = publish_job(client, names, job.model_copy(update={"image_ref": ref}))
        else:
            entry = publish_job(client, names, job, image=data)
        print(f"{job.job_id}\t{file}\t{entry}", flush=True)


@app.command()
def results(
    line: Annotated[str, typer.Option(help="Production line.")] = "default",
    follow: Annotated[bool, typer.Option(help="Wait for new results.")] = False,
    count: Annotated[int, typer.Option(help="How many of the latest results.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON result per line.")] = False,
) -> None:
    """Print results (the latest ``count``, or follow new ones)."""
    settings = _settings()
    _require_stack(settings)
    from cluster.connections import redis_client
    from workers.results import follow_results, read_results

    client = redis_client(settings)
    names = StreamNames(settings.stream_prefix)
    newest = client.xrevrange(names.results(line), count=count)
    start = newest[-1][0].decode() if newest else "-"
    found = list(read_results(client, names, line, start=start)) if newest else []
    stream = follow_results(client, names, line) if follow else iter(())
    for _, result in [*found, *stream]:
        if as_json:
            print(result.model_dump_json(), flush=True)
        else:
            verdict = "ANOMALOUS" if result.is_anomalous else "ok"
            print(
                f"{result.job_id}\t{verdict}\tscore={result.image_score:.2f}\tregions={len(result.regions)}\t"
                f"{result.model_version}\t{result.map_ref}",
                flush=True,
            )


@app.command()
def status(
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every --interval seconds until Ctrl-C.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object (with --watch: one per line, per refresh).")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.2, max=3600, help="Seconds between refreshes (--watch).")] = 2.0,
    serve_status: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Ask Ray for Serve applications and replicas.")
    ] = True,
) -> None:
    """Streams (length, lag, pending, consumers), dead letters, throughput, latency, Serve and the live model.

    Exit status 1 when Redis does not answer (the JSON says why).
    """
    settings = _settings()
    if settings.redis_url is None:
        _fail("REDIS_URL not set and no embedded stack is up: run `anomap stack up` first")
    from rich.live import Live

    from cluster.status import StatusOptions, gather_status
    from cluster.status_view import render_status

    options = StatusOptions(serve=serve_status)
    if not watch:
        document = gather_status(settings, options)
        if as_json:
            print(json.dumps(document), flush=True)
        else:
            console.print(render_status(document))
        if not document["redis"]["ok"]:
            raise typer.Exit(1)
        return
    try:
        if as_json:
            while True:
                print(json.dumps(gather_status(settings, options)), flush=True)
                time.sleep(interval)
        with Live(render_status(gather_status(settings, options)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_status(gather_status(settings, options)), refresh=True)
    except KeyboardInterrupt:
        return


@app.command()
def loadgen(
    cameras: Annotated[int, typer.Option(min=1, max=1024, help="Simulated cameras.")] = 4,
    fps: Annotated[float, typer.Option(min=0.01, max=1000, help="Frames per second, per camera.")] = 1.0,
    duration: Annotated[float, typer.Option(min=0.1, max=86_400, help="Seconds of publishing.")] = 30.0,
    by_reference: Annotated[
        bool, typer.Option("--by-reference/--inline", help="Upload each image and send an s3:// ref.")
    ] = False,
    line: Annotated[str, typer.Option(help="Production line.")] = "default",
    size: Annotated[int, typer.Option(min=32, max=8192, help="Image size in pixels.")] = 256,
    pool: Annotated[int, typer.Option(min=1, max=64, help="Distinct images per camera, sent round-robin.")] = 4,
    defect_share: Annotated[float, typer.Option(min=0, max=1, help="Share of each pool with a defect.")] = 0.5,
    grace: Annotated[float, typer.Option(min=0, help="Seconds to wait for answers after publishing.")] = 60.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the summary as JSON here.")] = None,
) -> None:
    """Open-loop load: every camera publishes at --fps for --duration s; prints rates and latencies."""
    settings = _settings()
    if settings.redis_url is None or (by_reference and settings.s3_endpoint is None):
        _fail(
            "REDIS_URL (and S3_ENDPOINT for --by-reference) not set and no embedded stack is up: run `anomap stack up`"
        )
    from pydantic import ValidationError
    from rich.live import Live

    from cluster.connections import object_store, redis_client
    from workers.loadgen import LoadGenerator, camera_images, progress_line, publish_schedule

    try:
        InspectionJob(job_id="loadgen-check", line=line)
    except ValidationError as exc:
        _fail(f"invalid --line: {exc.errors()[0]['msg']}")
    schedule = publish_schedule(cameras, fps, duration)
    if not schedule[0]:
        _fail(f"--fps {fps} × --duration {duration} is less than one frame per camera")
    with console.status(f"making {cameras} × {pool} images of {size}² px"):
        pools = camera_images(cameras, size, pool, defect_share)
    store = object_store(settings) if by_reference else None
    names = StreamNames(settings.stream_prefix)
    generator = LoadGenerator(redis_client(settings), names, store, line, pools, uuid.uuid4().hex[:8])
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        summary = generator.run(schedule, fps, duration, grace, lambda p: live.update(progress_line(p)))
    document = summary.as_dict()
    latency, lag = document["latency_ms"], document["publish_lag_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    console.print(
        f"run {document['run_id']}: offered {document['offered']} ({document['offered_rate']:.2f}/s), "
        f"results {document['results']}, dead letters {document['dead_letters']}, "
        f"unanswered {document['unanswered']}, achieved {document['achieved_rate']:.2f}/s over "
        f"{document['span_s']:.1f} s\nlatency ms p50 {ms(latency['p50'])} p95 {ms(latency['p95'])} "
        f"p99 {ms(latency['p99'])}; publish lag ms p50 {ms(lag['p50'])} max {ms(lag['max'])}; "
        f"achieved == offered: {document['achieved_equals_offered']}"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(document, indent=2) + "\n")
    if document["unanswered"]:
        err.print(f"[red]{document['unanswered']} jobs were not answered within --grace {grace} s[/red]")
        raise typer.Exit(1)
    if document["dead_letters"]:
        err.print(f"[red]{document['dead_letters']} jobs became dead letters (see anomap:dead)[/red]")
        raise typer.Exit(1)


@app.command()
def demo(
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the summary as JSON here.")] = None,
    report: Annotated[Path, typer.Option(help="Folder for the visual report.")] = Path("demo-report"),
    jobs: Annotated[int, typer.Option(min=4, max=10_000, help="Images the cameras publish.")] = 48,
    cameras: Annotated[int, typer.Option(min=1, max=64)] = 4,
    size: Annotated[int, typer.Option(min=64, max=4096, help="Image size in pixels.")] = 1024,
) -> None:
    """Run the whole system once: stack, data, training, serving, a camera fleet, a report."""
    from cluster.demo import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(jobs=jobs, cameras=cameras, image_size=size, report_dir=report, json_path=json_path), console
    )
    if summary["results"] != summary["published"] or summary["dead_letters"]:
        err.print("[red]not every job produced a result[/red]")
        raise typer.Exit(1)


from cluster.cli_rescore import rescore  # noqa: E402  (archive re-scoring lives in its own module)

app.command()(rescore)

from cluster.cli_confirm import confirm, confirmations_app  # noqa: E402  (confirmations live in their own module)
from cluster.cli_models import models_app  # noqa: E402

app.command()(confirm)
app.add_typer(confirmations_app, name="confirmations")
app.add_typer(models_app, name="models")

from cluster.cli_retrain import datasets_app, retrain  # noqa: E402  (the retraining controller's own module)

app.command()(retrain)
app.add_typer(datasets_app, name="datasets")

from cluster.cli_retention import retention  # noqa: E402  (object-store expiry rules)

app.command()(retention)


def _unreachable(exc: BaseException) -> str | None:
    """A one-line message when ``exc`` means a service could not be reached, else None."""
    import redis
    import urllib3.exceptions

    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"cannot reach Redis ({exc}); is the stack up (`anomap stack status`) and REDIS_URL right?"
    if isinstance(exc, urllib3.exceptions.MaxRetryError | urllib3.exceptions.NewConnectionError):
        return f"cannot reach the object store ({exc.__class__.__name__}); check S3_ENDPOINT and `anomap stack status`"
    return None


def main() -> None:
    """Console-script entry point: an unreachable Redis or object store is a one-line error, not a traceback."""
    try:
        sys.exit(app(standalone_mode=True))
    except Exception as exc:
        message = _unreachable(exc)
        if message is None:
            raise
        err.print(f"[red]error:[/red] {message}")
        sys.exit(2)
