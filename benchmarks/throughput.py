"""Throughput of the inspection path on one machine, three ways, on the same model and images.

    python benchmarks/throughput.py --quick --json /tmp/t.json

(a) ``inprocess``: tiling + model forward + stitching in this Python process (all cores);
(b) ``serve``: the Ray Serve app through a handle (ingress + PatchScorer replicas);
(c) ``stream``: publish → Valkey stream → consumers → Serve → SeaweedFS → results stream.

All three run forward passes of ``--batch`` patches; the Serve app sends each scorer ranges of up to
``--chunk`` patches (defaults: the Serve app's for the device, 128 / 1024 on a CPU and 2048 / 2048 with
CUDA, where each scorer replica takes 0.5 GPU). A shared machine's speed drifts by more than the
differences measured, so the run is ``--rounds`` rounds (3 by default), each bracketed by (a) with
nothing of Serve running: (a), deploy, (b), (c), Serve shut down and its processes gone, (a), ...
A round's ratio divides its (b) or (c) by the mean of the (a) runs before and after it;
``ratio_serve`` and ``ratio_stream`` are the medians over rounds, ``*_rounds`` each round's, and
``ratio_*_vs_fastest`` the median rate over the fastest (a) of the whole run (the most conservative
reading). In the last round, open-loop latency of (c) at 50 % and 90 % of its median rate; then the
model's FLOPs per image and the machine's measured matmul rate. Everything runs on an embedded
stack in a temporary folder that is torn down at the end. Prints one JSON object (and writes it
with ``--json``); its ``load_avg_1m`` (before and after) shows whether other jobs shared the machine.

``--quick`` scores 12 images per phase, 15 s per latency level, within a time budget
(``--budget-s``, 270 s for ``--quick``): one image timed in-process before the first round sizes the
phases (`images_for_budget`, at least 6 images), so a slow VM measures on fewer images instead of
overrunning the 5 minutes the acceptance allows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import redis
import torch
from bench_output import emit_json
from ray import serve
from torch.utils.flop_counter import FlopCounterMode

from cluster.connections import connect_ray, object_store, redis_client
from cluster.stack import EmbeddedStack
from schemas import InspectionJob, Settings, StreamNames
from trainer.config import TrainConfig
from trainer.imaging import encode_png
from trainer.pipeline import initial_model_version
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.synthetic import DefectKind, synth_image
from workers.consumer import ConsumerConfig, StreamConsumer
from workers.inspection import LocalInspector, default_sizes, plan_inspection
from workers.publisher import publish_job
from workers.serve_app import ServeInspector, deploy

LINE = "bench"
QUICK_BUDGET_S = 270.0
"""``--quick``'s time budget: the acceptance allows 5 minutes, and the slowest 2-core VM measured took
6.5 minutes with a fixed 12 images per phase."""
MIN_BUDGET_IMAGES = 6
"""The fewest images a budget shrinks a phase to."""

SCHEDULES: dict[str, Callable[[], TrainConfig]] = {
    "demo": TrainConfig.demo,
    "wide": TrainConfig.wide,
    "tiny": TrainConfig.tiny,
}
"""``--schedule``: whose architecture is measured. ``tiny`` (base 4, Z = 8; the same P = 32, S = 16 tiling)
makes the model cheap, so what the plumbing costs per image stands out."""


def matmul_gflops(device: torch.device, repeats: int = 10) -> float:
    """Measured matmul rate on ``device``, in GFLOP/s, in the dtype the model runs in there: float32
    1024² on a CPU (this process's torch threads), bfloat16 8192² on CUDA (the scorers' autocast)."""
    on_gpu = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def flops_per_image(model: PatchModel, image: np.ndarray) -> float:
    """FLOPs of the model's forward passes for one image (torch's counter; tiling/stitching excluded)."""
    plan = plan_inspection(image, model.card, chunk_patches=10**6)
    with FlopCounterMode(display=False) as counter:
        model.score_patches(plan.chunks[0][:64])
    return counter.get_total_flops() * plan.layout.n_patches / 64


ROUND_ALLOWANCE_S = 20.0
"""Seconds a round spends outside its measured phases: deploying the app (13 s on the slowest 2-core VM
measured) and shutting Serve down."""
TAIL_ALLOWANCE_S = 15.0
"""Seconds after the last latency level: its last results, stopping consumers and Serve, tearing the stack down."""
SERVE_SLOWDOWN = 0.8
"""(b) and (c) are assumed to run at this share of (a)'s rate when a budget sizes the phases."""


def images_for_budget(
    budget_s: float, elapsed_s: float, seconds_per_image: float, rounds: int, latency_s: float, most: int, fewest: int
) -> int:
    """How many images each phase scores so the whole run fits in ``budget_s`` seconds.

    ``elapsed_s`` were spent already (stack, model, the FLOP and matmul measurements) and one in-process
    image took ``seconds_per_image``. Ahead: ``rounds + 1`` (a) phases and ``rounds`` each of (b) and
    (c), each one warm-up image plus n (at `SERVE_SLOWDOWN` × (a)'s rate, to be safe), two latency
    levels of ``latency_s``, and the allowances. Clamped to ``fewest..most`` (``most`` wins when it is
    the smaller): a machine too slow for ``fewest`` overruns the budget rather than measuring on too
    few images.
    """
    phases = 3 * rounds + 1
    left_s = budget_s - elapsed_s - rounds * ROUND_ALLOWANCE_S - 2 * latency_s - TAIL_ALLOWANCE_S
    per_phase_image_s = seconds_per_image / SERVE_SLOWDOWN
    n = int(left_s / (phases * per_phase_image_s)) - 1
    return max(min(fewest, most), min(most, n))


def rate(n: int, seconds: float) -> float:
    """Images per second."""
    return n / seconds if seconds > 0 else 0.0


def bench_inprocess(model: PatchModel, images: list[np.ndarray], batch: int) -> float:
    """(a): images/s scoring one after another in this process, forward passes of ``batch`` patches."""
    inspector = LocalInspector(model, chunk_patches=batch)
    inspector(images[0])  # warm-up
    start = time.perf_counter()
    for image in images:
        inspector(image)
    return rate(len(images), time.perf_counter() - start)


def bench_serve(images: list[np.ndarray], in_flight: int) -> float:
    """(b): images/s through the Serve handle with ``in_flight`` requests outstanding."""
    inspector = ServeInspector.connect()
    inspector(images[0])  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(inspector, images))
    return rate(len(images), time.perf_counter() - start)


def publish_and_wait(
    client: redis.Redis, names: StreamNames, pngs: list[bytes], interval_s: float, tag: str, timeout_s: float = 600
) -> tuple[float, list[float]]:
    """Publish ``pngs`` (every ``interval_s``; 0 = all at once); wait for their results."""
    stream = names.results(LINE)
    newest = client.xrevrange(stream, count=1)
    cursor = newest[0][0].decode() if newest else "0-0"
    start = time.perf_counter()
    for i, png in enumerate(pngs):
        if interval_s > 0:
            time.sleep(max(0.0, start + i * interval_s - time.perf_counter()))
        publish_job(client, names, InspectionJob(job_id=f"{tag}-{i:05d}", camera_id="bench", line=LINE), image=png)
    latencies: list[float] = []
    deadline = time.perf_counter() + timeout_s
    while len(latencies) < len(pngs) and time.perf_counter() < deadline:
        for _, items in client.xread({stream: cursor}, block=1000, count=100) or []:
            for entry_id, fields in items:
                cursor = entry_id.decode()
                latencies.append(json.loads(fields[b"result"])["latency_ms"])
    return time.perf_counter() - start, latencies


def start_consumers(
    settings: Settings, names: StreamNames, consumers: int, in_flight: int
) -> tuple[threading.Event, list[threading.Thread]]:
    """Run ``consumers`` `StreamConsumer` threads on ``LINE`` against the Serve app, ``in_flight`` jobs in all."""
    store = object_store(settings)
    stop = threading.Event()
    threads = []
    for i in range(consumers):
        consumer = StreamConsumer(
            redis_client(settings),
            store,
            ServeInspector.connect(),
            names,
            ConsumerConfig(consumer=f"bench-{i}", lines=(LINE,), max_in_flight=max(1, in_flight // consumers)),
        )
        consumer.ensure_groups()
        thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        thread.start()
        threads.append(thread)
    return stop, threads


def stop_consumers(stop: threading.Event, threads: list[threading.Thread]) -> None:
    """Stop the threads of `start_consumers` (each drains what it holds)."""
    stop.set()
    for thread in threads:
        thread.join(timeout=120)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 in ms."""
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    return {f"p{q}": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)}


def on_embedded_stack(measure: Callable[[Settings], dict[str, object]]) -> dict[str, object]:
    """Bring up an embedded stack in a temp folder, connect Ray, run ``measure`` on its settings; tear down."""
    with tempfile.TemporaryDirectory(prefix="anomap-bench-") as tmp:
        stack = EmbeddedStack(Settings(state_dir=Path(tmp)))
        with stack:
            settings = stack.settings
            assert settings is not None
            connect_ray(settings)
            try:
                return measure(settings)
            finally:
                serve.shutdown()
                ray.shutdown()


def add_path_arguments(parser: argparse.ArgumentParser, images: int) -> None:
    """The options every inspection-path benchmark shares (image size and count, Serve and consumer sizes)."""
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="demo", help="the model's architecture")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--replicas", type=int, default=2, help="PatchScorer replicas (0.5 GPU each on a GPU)")
    parser.add_argument("--ingress-replicas", type=int, default=1, help="InspectionService replicas")
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the in-process run")
    parser.add_argument("--batch", type=int, help="patches per forward pass, in every path (default: by device)")
    parser.add_argument("--chunk", type=int, help="patches per scorer request, Serve (default: by device)")


def fill_device_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """``--batch`` and ``--chunk`` left unset take the Serve app's defaults for this machine's device."""
    chunk, forward = default_sizes(on_gpu=torch.cuda.is_available())
    args.batch = forward if args.batch is None else args.batch
    args.chunk = chunk if args.chunk is None else args.chunk
    return args


def with_path_options(settings: Settings, args: argparse.Namespace) -> Settings:
    """``settings`` with the serving fields `add_path_arguments` sets (the scorer count goes to `deploy`)."""
    serving = settings.serving.updated({"ingress_replicas": args.ingress_replicas})
    return settings.model_copy(update={"serving": serving})


def run(args: argparse.Namespace) -> dict[str, object]:
    """Measure (a), (b), (c) and latency on an embedded stack."""
    started = time.monotonic()
    return on_embedded_stack(lambda settings: _measure(args, settings, started))


def bench_images_and_model(
    settings: Settings, size: int, n_images: int, schedule: str = "demo"
) -> tuple[list[np.ndarray], list[np.ndarray], PatchModel]:
    """``n_images`` synthetic images (every other one scratched) as uint8 and as float32 in [0, 1], and
    the ``schedule``'s untrained model, registered as a version in the settings' store (its weights cost
    the same to run as trained ones)."""
    registry = ModelRegistry(object_store(settings), settings.model_name)
    raw = [synth_image(seed, size, (DefectKind.SCRATCH,) if seed % 2 else ())[0] for seed in range(n_images)]
    images = [image.astype(np.float32) / 255.0 for image in raw]
    card = initial_model_version(registry, SCHEDULES[schedule](), images[:2])
    _, weights = registry.load(card.version)
    return raw, images, PatchModel.from_safetensors(card, weights)


def serve_processes() -> list[int]:
    """PIDs of Serve's controller and replica processes on this machine (Linux: from ``/proc``; else none)."""
    pids = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # not a process, or it ended meanwhile
            continue
        if b"ServeController" in cmdline or b"ServeReplica" in cmdline:
            pids.append(int(entry.name))
    return pids


def serve_down(timeout_s: float = 60.0) -> None:
    """Shut Serve down, controller included, and wait until its processes have exited: the next
    in-process run then has the machine as the first one had it (``serve.delete`` leaves the
    controller's control loop running, and replicas take a moment to exit)."""
    serve.shutdown()
    deadline = time.monotonic() + timeout_s
    while serve_processes() and time.monotonic() < deadline:
        time.sleep(0.2)


def bracketed_ratios(rates: list[float], inprocess_runs: list[float]) -> list[float]:
    """Each round's ratio to the in-process rate around it: ``rates[i]`` was measured between
    ``inprocess_runs[i]`` and ``inprocess_runs[i + 1]`` and is divided by their mean (a machine whose
    speed drifts linearly cancels out). Needs one more in-process run than rounds."""
    if len(inprocess_runs) != len(rates) + 1:
        msg = f"{len(rates)} rounds need {len(rates) + 1} in-process runs around them, got {len(inprocess_runs)}"
        raise ValueError(msg)
    return [
        rate_ / ((before + after) / 2)
        for rate_, before, after in zip(rates, inprocess_runs[:-1], inprocess_runs[1:], strict=True)
    ]


def _measure_latency(
    client: redis.Redis, names: StreamNames, pngs: list[bytes], stream_ips: float, latency_s: float
) -> dict[str, dict[str, float]]:
    """Open-loop latency of the stream path at 50 % and 90 % of ``stream_ips``, ``latency_s`` seconds each."""
    latency = {}
    for share in (0.5, 0.9):
        n = max(4, round(stream_ips * share * latency_s))
        jobs = [pngs[i % len(pngs)] for i in range(n)]
        _, lat = publish_and_wait(client, names, jobs, 1.0 / (stream_ips * share), f"open{int(share * 100)}")
        latency[f"at_{int(share * 100)}pct"] = {"offered_ips": round(stream_ips * share, 3), **percentiles(lat)}
    return latency


def _measure(args: argparse.Namespace, settings: Settings, started: float) -> dict[str, object]:
    settings = with_path_options(settings, args)
    raw, images, model = bench_images_and_model(settings, args.size, args.images, args.schedule)
    card = model.card
    torch.set_num_threads(args.threads)
    flops = flops_per_image(model, images[0])
    gflops = matmul_gflops(model.device)
    if args.budget_s is not None:  # one timed image (it also warms the model up) sizes every phase
        one = time.perf_counter()
        LocalInspector(model, chunk_patches=args.batch)(images[0])
        seconds_per_image = time.perf_counter() - one
        n = images_for_budget(
            args.budget_s,
            time.monotonic() - started,
            seconds_per_image,
            args.rounds,
            args.latency_s,
            most=len(images),
            fewest=MIN_BUDGET_IMAGES,
        )
        raw, images = raw[:n], images[:n]
    pngs = [encode_png(image) for image in raw]
    load_before = os.getloadavg()[0]
    names = StreamNames(settings.stream_prefix)
    client = redis_client(settings)
    inprocess_runs = [bench_inprocess(model, images, args.batch)]
    serve_runs: list[float] = []
    stream_runs: list[float] = []
    latency: dict[str, dict[str, float]] = {}
    for round_ in range(args.rounds):  # (b) and (c) with Serve up, then (a) with Serve down: rounds bracketed by (a)
        deploy(
            settings, card.version, scorer_replicas=args.replicas, chunk_patches=args.chunk, forward_patches=args.batch
        )
        serve_runs.append(bench_serve(images, in_flight=args.in_flight))
        stop, threads = start_consumers(settings, names, args.consumers, args.in_flight)
        try:
            publish_and_wait(client, names, pngs[:1], 0, f"warm{round_}")
            seconds, _ = publish_and_wait(client, names, pngs, 0, f"burst{round_}")
            stream_runs.append(rate(len(pngs), seconds))
            if round_ == args.rounds - 1:
                latency = _measure_latency(client, names, pngs, float(np.median(stream_runs)), args.latency_s)
        finally:
            stop_consumers(stop, threads)
        serve_down()
        inprocess_runs.append(bench_inprocess(model, images, args.batch))
    serve_ratios = bracketed_ratios(serve_runs, inprocess_runs)
    stream_ratios = bracketed_ratios(stream_runs, inprocess_runs)
    fastest = max(inprocess_runs)
    return {
        "device": device_name(model.device),
        "ray_gpus": ray.cluster_resources().get("GPU", 0),
        "ingress_replicas": settings.serving.ingress_replicas,
        "consumers": args.consumers,
        "in_flight": args.in_flight,
        "schedule": args.schedule,
        "image_size": args.size,
        "images": len(images),
        "budget_s": args.budget_s,
        "rounds": args.rounds,
        "patch_size": card.patch_size,
        "stride": card.stride,
        "forward_batch": args.batch,
        "chunk_patches": args.chunk,
        "scorer_replicas": args.replicas,
        "inprocess_ips": round(float(np.median(inprocess_runs)), 4),
        "inprocess_ips_runs": [round(value, 4) for value in inprocess_runs],
        "serve_ips": round(float(np.median(serve_runs)), 4),
        "serve_ips_runs": [round(value, 4) for value in serve_runs],
        "stream_ips": round(float(np.median(stream_runs)), 4),
        "stream_ips_runs": [round(value, 4) for value in stream_runs],
        "ratio_serve": round(float(np.median(serve_ratios)), 3),
        "ratio_stream": round(float(np.median(stream_ratios)), 3),
        "ratio_serve_rounds": [round(value, 3) for value in serve_ratios],
        "ratio_stream_rounds": [round(value, 3) for value in stream_ratios],
        "ratio_serve_vs_fastest": round(float(np.median(serve_runs)) / fastest, 3),
        "ratio_stream_vs_fastest": round(float(np.median(stream_runs)) / fastest, 3),
        "latency_ms": latency["at_50pct"],
        "latency_by_load": latency,
        "model_gflop_per_image": round(flops / 1e9, 2),
        "matmul_gflops": round(gflops, 1),
        "model_bound_ips": round(gflops * 1e9 / flops, 3),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and a shorter latency run")
    add_path_arguments(parser, images=24)
    parser.add_argument("--latency-s", type=float, default=40.0, help="seconds of open-loop load per level")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (b) and (c), each between two runs of (a)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help=f"size the phases from one timed image so the run takes about this long (at least "
        f"{MIN_BUDGET_IMAGES} images per phase; --quick: {QUICK_BUDGET_S:.0f})",
    )
    args = fill_device_sizes(parser.parse_args())
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.quick:
        args.images, args.latency_s = min(args.images, 12), min(args.latency_s, 15.0)
        args.budget_s = QUICK_BUDGET_S if args.budget_s is None else args.budget_s
    result = run(args)
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
