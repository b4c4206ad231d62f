"""Training throughput under Ray Train with 1 and with 2 workers, same global batch, same short schedule.

    python benchmarks/train_scaling.py --json /tmp/train_scaling.json

Each run is the real `trainer.distributed.run_training` (DDP over gloo, a checkpoint every epoch to a
temporary folder) on the demo's networks (P = 64, 16 base channels, global batch 32, γ = 1). Rank 0
posts every epoch's step to a small clock actor, which stamps it on arrival; throughput is measured
between the first and the last GAN-phase epoch, so worker start-up, the first epoch's warm-up and the
encoder phase are left out. Each worker gets ``--cpus-per-worker`` Ray CPUs (Ray sets its torch
threads to match). A local Ray cluster is started for the benchmark and stopped after. Prints one
JSON object (and writes it with ``--json``)::

    {"workers_1": {"patches_per_s": 97.0, ...}, "workers_2": {"patches_per_s": 170.2, ...}, "ratio": 1.75}

``patches_per_s`` counts the normal training patches of the global batch (each GAN step also generates
as many fakes and runs D on both). On a shared machine read ``load_average_1m`` first: with other
work on the cores the ratio says more about the neighbours than about DDP.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from bench_output import emit_json

from cluster.connections import LocalRay
from trainer.config import TrainConfig
from trainer.distributed import run_training
from trainer.store import CheckpointStorage


@ray.remote(num_cpus=0)
class EpochClock:
    """Stands in for `trainer.progress.ProgressBoard`: stamps each ``(step, time)`` rank 0 posts."""

    def __init__(self) -> None:
        self.stamps: list[tuple[int, float]] = []

    def started(self, resumed_from: int | None) -> None:
        """A worker group started (as `ProgressBoard.started`); the clock only stamps steps."""

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """Record that rank 0 reached ``step`` now (same signature as `ProgressBoard.update`)."""
        self.stamps.append((step, time.monotonic()))

    def read(self) -> list[tuple[int, float]]:
        """Every ``(step, monotonic seconds)`` recorded so far."""
        return list(self.stamps)


@ray.remote
def torch_threads() -> int:
    """The torch intra-op thread count Ray gives a task of the requested CPUs (as it does a worker)."""
    return torch.get_num_threads()


def schedule(args: argparse.Namespace, num_workers: int) -> TrainConfig:
    """The demo's networks and global batch on a short, GAN-heavy schedule."""
    return TrainConfig.demo(
        gamma=1.0,
        num_workers=num_workers,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        gan_steps=args.steps_per_epoch * (args.epochs + 1),  # +1: the first epoch is warm-up, not measured
        encoder_steps=1,
        max_failures=0,
    )


def measure(cfg: TrainConfig, images: list[np.ndarray], storage: CheckpointStorage) -> dict[str, Any]:
    """One `run_training` call; patches/s between the first and the last GAN-phase epoch."""
    clock = EpochClock.remote()
    started = time.monotonic()
    run_training(cfg, images, None, storage, f"scaling-{cfg.num_workers}-{uuid.uuid4().hex[:8]}", progress_board=clock)
    fit_s = time.monotonic() - started
    stamps = [(step, t) for step, t in ray.get(clock.read.remote()) if step <= cfg.gan_steps]
    ray.kill(clock)
    (first_step, first_t), (last_step, last_t) = stamps[0], stamps[-1]
    steps, seconds = last_step - first_step, last_t - first_t
    if steps <= 0 or seconds <= 0:
        msg = f"too few epochs to measure: {stamps}"
        raise RuntimeError(msg)
    return {
        "patches_per_s": round(steps * cfg.batch_size / seconds, 1),
        "steps_per_s": round(steps / seconds, 3),
        "measured_steps": steps,
        "measured_s": round(seconds, 2),
        "epoch_s": [round(b - a, 2) for (_, a), (_, b) in itertools.pairwise(stamps)],
        "per_worker_batch": cfg.per_worker_batch,
        "fit_s": round(fit_s, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs on one local Ray cluster; the result as a dict."""
    rng = np.random.default_rng(0)
    images = [rng.integers(60, 200, (args.image_size, args.image_size), dtype=np.uint8) for _ in range(8)]
    result: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    with LocalRay(num_cpus=args.ray_cpus, log_to_driver=False), tempfile.TemporaryDirectory() as folder:
        storage = CheckpointStorage.local(folder)
        threads = ray.get(torch_threads.options(num_cpus=args.cpus_per_worker).remote())
        for num_workers in (1, 2):
            result[f"workers_{num_workers}"] = measure(schedule(args, num_workers), images, storage)
    cfg = schedule(args, 2)
    result["ratio"] = round(result["workers_2"]["patches_per_s"] / result["workers_1"]["patches_per_s"], 3)
    result["config"] = {
        "patch_size": cfg.patch_size,
        "base_channels": cfg.base_channels,
        "latent_dim": cfg.latent_dim,
        "global_batch": cfg.batch_size,
        "steps_per_epoch": cfg.steps_per_epoch,
        "measured_epochs": args.epochs,
        "cpus_per_worker": cfg.cpus_per_worker,
        "torch_threads_per_worker": threads,
        "machine_cpus": os.cpu_count(),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: others' load
        "checkpoints": "local temporary folder, every epoch",
    }
    return result


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--batch-size", type=int, default=32, help="global normal-patch batch (both runs)")
    parser.add_argument("--steps-per-epoch", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (one more runs first as warm-up)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--ray-cpus", type=int, default=4, help="CPUs the local Ray cluster advertises")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    result = run(args)
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
