"""Archive re-scoring rate (`workers.rescore` on Ray Data) beside the in-process rate, in one run.

    python benchmarks/rescore.py --json /tmp/r.json            # 48 images, ~3 min: the ratio to report
    python benchmarks/rescore.py --quick --json /tmp/r.json    # 24 images: a smoke run, reads 0.1-0.2 low

The model and images are those of ``benchmarks/throughput.py`` (the demo architecture, P = 32, S = 16;
untrained weights, which cost the same; synthetic 1024² brushed metal, every other image scratched),
so the numbers sit beside its (a):

(a) ``inprocess``: `LocalInspector` one image after another in this process, 2 torch threads,
    forward passes of ``--batch`` patches, the image already decoded and nothing stored; run before
    and after the re-scoring, the faster of the two is the reference (as in throughput.py).
(r) ``rescore``: the same images as PNG files in a folder, ``rescore()`` with the default actor count
    (the free CPUs of the embedded Ray head, 1 CPU and 1 torch thread each): read, decode, score,
    write the .npz map and the JPEG overlay to SeaweedFS, Parquet manifest.

``rescore_ips`` is the steady rate, from the manifest's ``scored_at`` (set by the actor once an image's
maps are stored): the images finished after the first ``actors`` (each actor's first, its warm-up, as
(a)'s warm-up image), over the time from the ``actors``-th to the last; ``rescore_wall_ips`` counts
the whole run (listing, actor start-up and model loads included). ``ratio_rescore`` =
rescore_ips / inprocess_ips. The actors start a few seconds apart, so the steady window holds
stretches where one actor works alone at both ends: on 24 images (``--quick``) that costs 0.1-0.2
of the ratio, on 48 little (docs/benchmarks.md). A second run on the same folder must score nothing (``rerun``).
``load_avg_1m`` (before, after) shows whether other jobs shared the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from bench_output import emit_json

from cluster.connections import connect_ray, object_store
from cluster.stack import EmbeddedStack
from schemas import Settings
from trainer.config import TrainConfig
from trainer.imaging import encode_png
from trainer.pipeline import initial_model_version
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.synthetic import DefectKind, synth_image
from workers.inspection import LocalInspector
from workers.rescore import RescoreOptions, rescore


def bench_inprocess(model: PatchModel, images: list[np.ndarray], batch: int) -> float:
    """(a), as in throughput.py: images/s scoring one after another in this process."""
    inspector = LocalInspector(model, chunk_patches=batch)
    inspector(images[0])  # warm-up
    start = time.perf_counter()
    for image in images:
        inspector(image)
    return len(images) / (time.perf_counter() - start)


def steady_rate(finished_at: list[float], actors: int) -> float:
    """Images/s from the moment ``actors`` images had finished (each actor's first) to the last one."""
    if len(finished_at) <= actors:
        return 0.0
    span = finished_at[-1] - finished_at[actors - 1]
    return (len(finished_at) - actors) / span if span > 0 else 0.0


def run(args: argparse.Namespace) -> dict[str, object]:
    """Bring up a stack in a temp folder, measure (a), (r), (a) and a re-run; tear down."""
    with tempfile.TemporaryDirectory(prefix="anomap-bench-rescore-") as tmp:
        stack = EmbeddedStack(Settings(state_dir=Path(tmp) / "state"))
        with stack:
            settings = stack.settings
            assert settings is not None
            connect_ray(settings)
            try:
                return _measure(args, settings, Path(tmp) / "archive")
            finally:
                ray.shutdown()


def _measure(args: argparse.Namespace, settings: Settings, folder: Path) -> dict[str, object]:
    store = object_store(settings)
    registry = ModelRegistry(store, settings.model_name)
    raw = [synth_image(seed, args.size, (DefectKind.SCRATCH,) if seed % 2 else ())[0] for seed in range(args.images)]
    images = [image.astype(np.float32) / 255.0 for image in raw]
    folder.mkdir(parents=True)
    for i, image in enumerate(raw):
        (folder / f"img-{i:04d}.png").write_bytes(encode_png(image))
    card = initial_model_version(registry, TrainConfig.demo(), images[:2])
    _, weights = registry.load(card.version)
    torch.set_num_threads(args.threads)
    model = PatchModel.from_safetensors(card, weights)
    load_before = os.getloadavg()[0]
    inprocess_runs = [bench_inprocess(model, images, args.batch)]

    options = RescoreOptions(
        concurrency=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        forward_patches=args.batch,
        batch_images=args.batch_images,
    )
    summary = rescore(settings, str(folder), card.version, options)
    finished_at = sorted(  # when each actor had stored each image's map (scored_at), seconds
        ts.timestamp()
        for key in summary.manifest_parts
        for ts in pq.read_table(io.BytesIO(store.get_bytes(key)), columns=["scored_at"]).column(0).to_pylist()
    )
    rerun = rescore(settings, str(folder), card.version, options)
    inprocess_runs.append(bench_inprocess(model, images, args.batch))
    inprocess = max(inprocess_runs)
    steady = steady_rate(finished_at, summary.concurrency)
    return {
        "image_size": args.size,
        "images": args.images,
        "patch_size": card.patch_size,
        "stride": card.stride,
        "forward_batch": args.batch,
        "inprocess_threads": args.threads,
        "rescore_actors": summary.concurrency,
        "cpus_per_actor": args.cpus_per_actor,
        "batch_images": args.batch_images,
        "inprocess_ips": round(inprocess, 4),
        "inprocess_ips_runs": [round(value, 4) for value in inprocess_runs],
        "rescore_ips": round(steady, 4),
        "rescore_wall_ips": round(summary.images_per_s, 4),
        "rescore_seconds": round(summary.seconds, 2),
        "ratio_rescore": round(steady / inprocess, 3),
        "ratio_rescore_wall": round(summary.images_per_s / inprocess, 3),
        "scored": summary.scored,
        "bad": summary.bad,
        "rerun": {"skipped": rerun.skipped, "scored": rerun.scored, "seconds": round(rerun.seconds, 2)},
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="24 images (≤ 2 minutes on 2 cores); its ratio reads low")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the in-process run")
    parser.add_argument("--actors", type=int, default=None, help="scoring actors (default: the free CPUs)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    parser.add_argument("--batch", type=int, default=128, help="patches per forward pass, in both paths")
    parser.add_argument(
        "--batch-images",
        type=int,
        default=RescoreOptions.batch_images,
        help="images per actor call, scored one after the other (default: RescoreOptions.batch_images)",
    )
    args = parser.parse_args()
    if args.quick:
        args.images = min(args.images, 24)
    result = run(args)
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
