"""Where the CPU goes: CPU-seconds per image of the in-process path and of the Serve path, by process.

    python benchmarks/serve_cpu.py --json /tmp/cpu.json

Rates (images/s) on a shared VM drift by ±15 % within minutes (docs/benchmarks.md), more than the
plumbing being measured; CPU-seconds per image drift much less. This benchmark reads every
process's CPU time from ``/proc`` (Linux) around three phases on one embedded stack and one model
(the `benchmarks/throughput.py` setup: the demo architecture, untrained weights, 1024² images,
forward passes of ``--batch`` patches):

1. ``inprocess``: `LocalInspector` in this process with ``--threads`` torch threads (path (a));
2. ``idle``: ``--idle-s`` seconds with the Serve app deployed and nothing sent: the fixed background
   cost of Serve's controller, its replicas and Ray's own processes;
3. ``serve``: the same images through the Serve handle with ``--in-flight`` requests outstanding
   (path (b));
4. ``stream``: the same images published as PNG jobs to a Valkey stream and answered by
   ``--consumers`` `StreamConsumer` threads in this process (decode, Serve, map, overlay and kept
   image written to SeaweedFS, result committed): path (c). The consumers' CPU is in ``driver``.

Processes are grouped into roles (``scorer``, ``ingress``, ``serve_controller``, ``driver`` (this
process), ``ray_system`` (GCS, raylet, dashboard agent, log monitor, ...), ``other``). Alongside:
the model's forward pass alone in this process on one thread (``forward_1thread``), the floor of
what a one-thread scorer replica pays per image. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from bench_output import emit_json
from throughput import (
    add_path_arguments,
    bench_images_and_model,
    bench_inprocess,
    bench_serve,
    fill_device_sizes,
    on_embedded_stack,
    publish_and_wait,
    rate,
    start_consumers,
    stop_consumers,
    with_path_options,
)

from cluster.connections import redis_client
from schemas import Settings, StreamNames
from trainer.imaging import encode_png
from trainer.scoring import PatchModel, score_in_batches
from workers.inspection import plan_inspection
from workers.serve_app import deploy

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Snapshot = dict[int, tuple[str, float]]
"""pid → (role, CPU-seconds so far)."""


def role_of(pid: int, comm: str, cmdline: str) -> str:
    """The role of a process in the benchmark, from its name and command line."""
    if pid == os.getpid():
        return "driver"
    if "PatchScorer" in cmdline:
        return "scorer"
    if "InspectionService" in cmdline:
        return "ingress"
    if "ServeController" in cmdline:
        return "serve_controller"
    if comm in {"gcs_server", "raylet"} or "ray" in cmdline.lower():
        return "ray_system"
    return "other"


def cpu_snapshot() -> Snapshot:
    """CPU-seconds (user + system) of every process now, with its role."""
    snapshot: Snapshot = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        snapshot[int(entry)] = (role_of(int(entry), comm, cmdline), seconds)
    return snapshot


def cpu_by_role(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU-seconds spent between two snapshots, summed per role (processes that started meanwhile count whole)."""
    roles: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent = seconds - before.get(pid, (role, 0.0))[1]
        if spent > 0:
            roles[role] = roles.get(role, 0.0) + spent
    return {role: round(value, 3) for role, value in sorted(roles.items())}


def forward_seconds_per_image(model: PatchModel, image: np.ndarray, batch: int, repeats: int = 2) -> float:
    """CPU-seconds of this thread for the model's forward passes over one image's patches (no tiling or stitching)."""
    patches = plan_inspection(image, model.card, chunk_patches=10**6).chunks[0]
    score_in_batches(model, patches[: 2 * batch], batch)  # warm-up
    start = time.thread_time()
    for _ in range(repeats):
        score_in_batches(model, patches, batch)
    return (time.thread_time() - start) / repeats


def measure(args: argparse.Namespace, settings: Settings) -> dict[str, object]:
    """The four phases on a running stack; CPU-seconds per image by role, and the rates."""
    settings = with_path_options(settings, args)
    raw, images, model = bench_images_and_model(settings, args.size, args.images, args.schedule)

    torch.set_num_threads(1)
    forward_1thread = forward_seconds_per_image(model, images[0], args.batch)
    torch.set_num_threads(args.threads)

    before, start = cpu_snapshot(), time.perf_counter()
    inprocess_ips = bench_inprocess(model, images, args.batch)
    inprocess = {"seconds": time.perf_counter() - start, "cpu": cpu_by_role(before, cpu_snapshot())}

    version = model.card.version
    deploy(settings, version, scorer_replicas=args.replicas, chunk_patches=args.chunk, forward_patches=args.batch)
    bench_serve(images[:2], args.in_flight)  # every replica has run once
    time.sleep(2.0)
    before = cpu_snapshot()
    time.sleep(args.idle_s)
    idle = {"seconds": args.idle_s, "cpu": cpu_by_role(before, cpu_snapshot())}

    before, start = cpu_snapshot(), time.perf_counter()
    serve_ips = bench_serve(images, args.in_flight)
    served = {"seconds": time.perf_counter() - start, "cpu": cpu_by_role(before, cpu_snapshot())}

    names, client = StreamNames(settings.stream_prefix), redis_client(settings)
    pngs = [encode_png(image) for image in raw]
    stop, threads = start_consumers(settings, names, args.consumers, args.in_flight)
    try:
        publish_and_wait(client, names, pngs[:1], 0, "warm")
        before = cpu_snapshot()
        seconds, _ = publish_and_wait(client, names, [pngs[0], *pngs], 0, "burst")
        streamed = {"seconds": seconds, "cpu": cpu_by_role(before, cpu_snapshot())}
    finally:
        stop_consumers(stop, threads)

    n = len(images) + 1  # bench_inprocess and bench_serve each score one warm-up image first
    cores = os.cpu_count() or 1

    def per_image(phase: dict[str, object]) -> dict[str, float]:
        return {role: round(value / n, 4) for role, value in phase["cpu"].items()}  # type: ignore[union-attr]

    def busy_cores(phase: dict[str, object]) -> float:
        return round(sum(phase["cpu"].values()) / phase["seconds"], 3)  # type: ignore[union-attr,arg-type]

    return {
        "schedule": args.schedule,
        "image_size": args.size,
        "images": len(images),
        "cores": cores,
        "torch_threads_inprocess": args.threads,
        "scorer_replicas": args.replicas,
        "forward_1thread_cpu_s_per_image": round(forward_1thread, 4),
        "inprocess_ips": round(inprocess_ips, 4),
        "serve_ips": round(serve_ips, 4),
        "stream_ips": round(rate(n, streamed["seconds"]), 4),  # type: ignore[arg-type]
        "ratio_serve": round(serve_ips / inprocess_ips, 3),
        "ratio_stream": round(rate(n, streamed["seconds"]) / inprocess_ips, 3),  # type: ignore[arg-type]
        "inprocess_cpu_s_per_image": per_image(inprocess),
        "serve_cpu_s_per_image": per_image(served),
        "stream_cpu_s_per_image": per_image(streamed),
        "inprocess_busy_cores": busy_cores(inprocess),
        "serve_busy_cores": busy_cores(served),
        "stream_busy_cores": busy_cores(streamed),
        "idle_serve_cores": {role: round(value / args.idle_s, 4) for role, value in idle["cpu"].items()},  # type: ignore[union-attr]
        "idle_serve_cores_total": busy_cores(idle),
        "serve_images_per_cpu_s": round(rate(n, sum(served["cpu"].values())), 4),  # type: ignore[arg-type]
        "inprocess_images_per_cpu_s": round(rate(n, sum(inprocess["cpu"].values())), 4),  # type: ignore[arg-type]
        "stream_images_per_cpu_s": round(rate(n, sum(streamed["cpu"].values())), 4),  # type: ignore[arg-type]
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_path_arguments(parser, images=12)
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds of the idle phase")
    args = fill_device_sizes(parser.parse_args())
    result = on_embedded_stack(lambda settings: measure(args, settings))
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
