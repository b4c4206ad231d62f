"""The ``anomap`` command line.

anomap demo                      # the whole system once, on the embedded stack
anomap stack up|down|status      # the embedded Valkey + SeaweedFS + Ray head
anomap train --synthetic         # train a model version on Ray Train and make it live
anomap serve                     # Serve app + stream consumers for the live version
anomap publish PATH...           # images (files or folders) as jobs
anomap results [--follow]        # print results
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from schemas import InspectionJob, Settings, StreamNames

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


@app.command()
def train(
    synthetic: Annotated[bool, typer.Option(help="Train on generated brushed metal.")] = True,
    size: Annotated[int, typer.Option(help="Synthetic image size (pixels).")] = 1024,
    n_train: Annotated[int, typer.Option(help="Synthetic 'normal' training images.")] = 24,
    contamination: Annotated[float, typer.Option(help="Share of 'normal' images with unlabelled scratches.")] = 0.1,
    abnormal_k: Annotated[int, typer.Option(help="Confirmed abnormal images given to the discriminator.")] = 4,
    gamma: Annotated[float, typer.Option(help="Noisy-AnoGAN γ in (0, 1]; 1 is plain AnoGAN.")] = 0.9,
    schedule: Annotated[str, typer.Option(help="Training schedule: demo or tiny.")] = "demo",
    seed: Annotated[int, typer.Option()] = 0,
    live: Annotated[bool, typer.Option(help="Make the new version live.")] = True,
) -> None:
    """Train a Noisy-AnoGAN model version on Ray Train and store it in the registry."""
    if not synthetic:
        _fail("only --synthetic data is supported so far (folder datasets come with the method issue)")
    if not 0 < gamma <= 1:
        _fail(f"--gamma must be in (0, 1], got {gamma}")
    if not 0 <= contamination < 1:
        _fail(f"--contamination must be in [0, 1), got {contamination}")
    settings = _settings()
    _require_stack(settings)
    from cluster.connections import connect_ray, object_store
    from trainer.config import TrainConfig
    from trainer.pipeline import train_model_version
    from trainer.registry import ModelRegistry
    from trainer.synthetic import make_dataset

    schedules = {"demo": TrainConfig.demo, "tiny": TrainConfig.tiny}
    if schedule not in schedules:
        _fail(f"--schedule must be one of {sorted(schedules)}, got {schedule!r}")
    config = schedules[schedule](gamma=gamma, seed=seed)
    with console.status("generating data…"):
        data = make_dataset(size=size, n_train=n_train, contamination=contamination, n_abnormal=abnormal_k, seed=seed)
    connect_ray(settings)
    registry = ModelRegistry(object_store(settings), settings.model_name)
    card = train_model_version(
        config,
        data.train_normal,
        data.abnormal,
        data.abnormal_masks,
        data.calibration,
        registry=registry,
        name=settings.model_name,
        data_digest=data.digest(),
        storage_path=str((settings.state_dir / "train").resolve()),
        progress=console.log,
    )
    if live:
        registry.set_live(card.version)
    console.print_json(card.model_dump_json())


@app.command()
def serve(
    version: Annotated[str | None, typer.Option(help="Model version (default: the live one).")] = None,
    lines: Annotated[str, typer.Option(help="Comma-separated production lines to consume.")] = "default",
    consumers: Annotated[int, typer.Option(min=1, max=64)] = 2,
    replicas: Annotated[int, typer.Option(min=1, max=256, help="PatchScorer replicas.")] = 2,
) -> None:
    """Run the Serve app and stream consumers until interrupted (SIGINT/SIGTERM drain gracefully)."""
    settings = _settings()
    _require_stack(settings)
    from cluster.connections import connect_ray, object_store
    from cluster.serving import InspectionServer
    from trainer.registry import ModelNotFound, ModelRegistry

    registry = ModelRegistry(object_store(settings), settings.model_name)
    try:
        version = version or registry.live_version()
        registry.load_card(version)
    except ModelNotFound as exc:
        _fail(str(exc))
    line_ids = tuple(line.strip() for line in lines.split(",") if line.strip())
    connect_ray(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with InspectionServer(settings, version, consumers=consumers, lines=line_ids, scorer_replicas=replicas) as server:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server.stop.set())
        console.log(f"serving model {version} on lines {', '.join(line_ids)}; Ctrl-C drains and stops")
        server.wait()
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
        console.print(f"{job.job_id}\t{file}\t{entry}")


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
            console.print(
                f"{result.job_id}\t{verdict}\tscore={result.image_score:.2f}\t"
                f"regions={len(result.regions)}\t{result.model_version}\t{result.map_ref}"
            )


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


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
