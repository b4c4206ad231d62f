"""`anomap demo`: the whole system once, end to end, on the embedded (or configured) stack.

1. bring up Valkey, SeaweedFS and a Ray head (only what is not configured);
2. generate seeded synthetic brushed metal (a noisy "normal" set, a few confirmed scratches);
3. train a small Noisy-AnoGAN on Ray Train (2 workers, checkpoints to s3://<bucket>/train-runs/) and
   register it as the live version;
4. deploy the Serve app and consumer threads;
5. a simulated camera fleet publishes jobs (normal and scratched; some inline, some by reference)
   and waits for every answer;
6. print a summary (throughput, latency, AUROCs), write it as JSON and a visual report;
7. tear down what it started.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray import serve
from rich.console import Console
from rich.table import Table

from cluster.connections import connect_ray, object_store, redis_client
from cluster.report import ReportCase, write_report
from cluster.serving import InspectionServer
from cluster.stack import EmbeddedStack
from cluster.state import Component, StackState
from schemas import InspectionJob, Settings, StreamNames
from trainer.config import TrainConfig
from trainer.imaging import encode_png
from trainer.metrics import image_auroc, pixel_auroc
from trainer.pipeline import train_model_version
from trainer.registry import ModelRegistry
from trainer.store import CheckpointStorage
from trainer.synthetic import SyntheticDataset, make_dataset
from workers.fleet import CameraFleet, CameraJob, FleetOutcome
from workers.maps import decode_map
from workers.model_events import promote_model

DEMO_LINE = "demo"


@dataclass(frozen=True)
class DemoOptions:
    """What the demo does; the defaults finish in a few minutes on 2 CPU cores."""

    jobs: int = 48
    cameras: int = 4
    image_size: int = 1024
    n_train: int = 24
    contamination: float = 0.1
    abnormal_k: int = 4
    gamma: float = 0.9
    seed: int = 0
    report_dir: Path = Path("demo-report")
    json_path: Path | None = None


def _camera_jobs(dataset: SyntheticDataset, options: DemoOptions, run_tag: str) -> dict[str, list[CameraJob]]:
    cameras = [f"cam{i + 1:02d}" for i in range(options.cameras)]
    jobs: dict[str, list[CameraJob]] = {camera: [] for camera in cameras}
    for i, image in enumerate(dataset.test_images):
        camera = cameras[i % len(cameras)]
        job = InspectionJob(job_id=f"{camera}-{run_tag}-{i:04d}", camera_id=camera, line=DEMO_LINE)
        jobs[camera].append(CameraJob(job, encode_png(image), by_reference=(i % 4 == 3)))
    return jobs


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _evaluate(
    outcome: FleetOutcome, dataset: SyntheticDataset, settings: Settings
) -> tuple[dict[str, float], list[ReportCase]]:
    """Image AUROC and pixel AUROC over the answered jobs, from the maps in the object store."""
    store = object_store(settings)
    scores, labels, maps, masks, cases = [], [], [], [], []
    for job_id, result in sorted(outcome.results.items()):
        i = int(job_id.rsplit("-", 1)[1])  # job ids end with the test image's index
        mask = dataset.test_masks[i]
        anomaly_map = decode_map(store.get_bytes(result.map_ref.split("/", 3)[3]))
        scores.append(result.image_score)
        labels.append(bool(mask.any()))
        maps.append(anomaly_map)
        masks.append(mask)
        cases.append((job_id, result, i))
    metrics = {"image_auroc": float("nan"), "pixel_auroc": float("nan")}
    if len(set(labels)) == 2:
        metrics["image_auroc"] = image_auroc(np.asarray(scores), np.asarray(labels))
        metrics["pixel_auroc"] = pixel_auroc(maps, masks)
    # show the best- and worst-scored defects and normals
    order = sorted(cases, key=lambda c: c[1].image_score)
    normals = [c for c in order if not dataset.test_masks[c[2]].any()]
    defects = [c for c in order if dataset.test_masks[c[2]].any()]
    picks = defects[-2:] + defects[:1] + normals[-1:] + normals[:1]
    chosen = list({case[0]: case for case in picks}.values())  # each job once, even in a short run
    report = [
        ReportCase(
            job_id=job_id,
            camera_id=result.camera_id,
            image=dataset.test_images[i].astype(np.float32) / 255.0,
            overlay_jpeg=store.get_bytes(result.overlay_ref.split("/", 3)[3]),
            mask=dataset.test_masks[i],
            image_score=result.image_score,
            is_anomalous=result.is_anomalous,
            n_regions=len(result.regions),
        )
        for job_id, result, i in chosen
    ]
    return metrics, report


class DemoRefused(RuntimeError):
    """The demo would disturb a system it did not start (a Serve app already running on the Ray cluster)."""


def _started_here(state: StackState | None, component: Component) -> bool:
    """Whether this run's stack started ``component`` itself (not configured, not an `anomap stack up` one)."""
    return state is not None and state.components[component].server is not None


def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, object]:
    """Run the demo; returns the summary (also written as JSON when ``options.json_path`` is set).

    On servers it did not start (``REDIS_URL``, ``S3_ENDPOINT``, ``RAY_ADDRESS`` or a stack brought up
    with ``anomap stack up``) the demo leaves what is there alone: it refuses to run where a Serve
    application is running (`DemoRefused`: it would replace the ``anomap`` app), makes its model live
    on the ``demo`` line only when the object store is not its own, and deletes only its own Serve app.
    """
    console = console or Console()
    began = time.monotonic()
    settings = Settings.from_env()
    stack = EmbeddedStack(settings, progress=console.log)
    with stack:
        assert stack.settings is not None  # set on entry
        settings = stack.settings
        own_ray, own_store = _started_here(stack.state, Component.RAY), _started_here(stack.state, Component.S3)
        connect_ray(settings)
        try:
            running = sorted(serve.status().applications)
            if running and not own_ray:
                msg = (
                    f"Serve applications {running} are running on the Ray cluster at {settings.ray_address}: the demo "
                    "would replace the 'anomap' app. Run it where nothing of anomap runs (unset RAY_ADDRESS, "
                    "REDIS_URL and S3_ENDPOINT, or `anomap stack down` first)"
                )
                raise DemoRefused(msg)
            return _run(options, settings, console, began, default_live=own_store)
        finally:
            # A cluster it joined is left as it was (the driver goes with this process). Its own head is stopped
            # with the stack, Serve and all: shutting Serve down first only made the driver's pending calls to the
            # killed controller print warnings.
            if own_ray:
                ray.shutdown()


def _run(
    options: DemoOptions, settings: Settings, console: Console, began: float, default_live: bool
) -> dict[str, object]:
    run_tag = uuid.uuid4().hex[:6]
    n_normal = options.jobs // 2
    with console.status("generating synthetic brushed metal…"):
        dataset = make_dataset(
            size=options.image_size,
            n_train=options.n_train,
            contamination=options.contamination,
            n_abnormal=options.abnormal_k,
            n_calibration=4,
            n_test_normal=n_normal,
            n_test_defect=options.jobs - n_normal,
            seed=options.seed,
        )
    console.log(
        f"data: {len(dataset.train_normal)} 'normal' training images "
        f"({sum(dataset.train_contaminated)} secretly scratched), {len(dataset.abnormal)} confirmed abnormal, "
        f"{len(dataset.test_images)} test images"
    )
    store = object_store(settings)
    registry = ModelRegistry(store, settings.model_name)
    train_started = time.monotonic()
    config = TrainConfig.demo(gamma=options.gamma, seed=options.seed)
    card = train_model_version(
        config,
        dataset.train_normal,
        dataset.abnormal,
        dataset.abnormal_masks,
        dataset.calibration,
        registry=registry,
        name=settings.model_name,
        data_digest=dataset.digest(),
        storage=CheckpointStorage.object_store(settings),
        progress=console.log,
    )
    client = redis_client(settings)
    names = StreamNames(settings.stream_prefix)
    # its own store: the demo model is the live one, for commands run after it; a store it shares: only the
    # demo line's pointer moves. Either way under the model's pointer lock, announced on anomap:models.
    promote_model(registry, client, names, card.version, None if default_live else DEMO_LINE, "anomap demo")
    train_s = time.monotonic() - train_started
    console.log(f"trained and registered model version {card.version} in {train_s:.0f} s (γ = {card.gamma})")

    jobs = _camera_jobs(dataset, options, run_tag)
    with InspectionServer(settings, card.version, consumers=2, lines=(DEMO_LINE,), claim_idle_ms=30_000):
        console.log("Serve app and 2 stream consumers are up; cameras start publishing")
        fleet = CameraFleet(client, names, store, DEMO_LINE)
        last = [0]

        def show(outcome: FleetOutcome) -> None:
            if outcome.answered >= last[0] + 8 or outcome.answered == sum(len(v) for v in jobs.values()):
                last[0] = outcome.answered
                console.log(f"answered {outcome.answered}/{outcome.published} published")

        outcome = fleet.run(jobs, timeout_s=900, on_answer=show)
    metrics, cases = _evaluate(outcome, dataset, settings)
    latencies = [r.latency_ms for r in outcome.results.values()]
    summary: dict[str, object] = {
        "published": outcome.published,
        "results": len(outcome.results),
        "dead_letters": len(outcome.dead),
        "images_per_s": round(outcome.images_per_s, 3),
        "latency_ms": {"p50": round(_percentile(latencies, 50), 1), "p95": round(_percentile(latencies, 95), 1)},
        "image_auroc": round(metrics["image_auroc"], 4),
        "pixel_auroc": round(metrics["pixel_auroc"], 4),
        "model_version": card.version,
        "map_keys": sorted(r.map_ref for r in outcome.results.values())[:5],
        "image_size": options.image_size,
        "cameras": options.cameras,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.monotonic() - began, 1),
    }
    report = write_report(options.report_dir, cases, summary)
    _print_summary(console, summary, report)
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(summary, indent=2))
    return summary


def _print_summary(console: Console, summary: dict[str, object], report: Path) -> None:
    table = Table(title="anomap demo", show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    console.print(table)
    console.print(f"visual report: {report}")
