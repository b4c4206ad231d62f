"""What finishing a stitched map costs: the Gaussian of earlier versions against the line filter.

Times `trainer.scoring.finish_map` on a random (size, size) float32 map, the median of ``--repeats``
calls after one warm-up, on ``--threads`` torch threads (the in-process scorer has 2, a Serve ingress
replica 1)::

    python benchmarks/map_finish.py --size 1024 --threads 1 --json /tmp/finish.json

Prints JSON: milliseconds per map for each finish (Gaussian σ = 2; the line filter of 15 px on magnitudes;
15 px after a Gaussian σ = 1; 21 px; 15 px on a signed map, then a Gaussian σ = 0.7; the same with 7 px
segments at 0.6 and discs of 3 px: the demo's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_output import emit_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.scoring import finish_map

FINISHES: dict[str, dict[str, Any]] = {
    "gaussian_2": {"sigma": 2.0},
    "line_15": {"sigma": 0.0, "line_length": 15},
    "gaussian_1_line_15": {"sigma": 1.0, "line_length": 15},
    "line_21": {"sigma": 0.0, "line_length": 21},
    "signed_line_15_gaussian_0.7": {"sigma": 0.7, "line_length": 15, "signed": True},
    "signed_shapes_gaussian_0.7": {
        "sigma": 0.7,
        "line_length": 15,
        "signed": True,
        "short_segment_weight": 0.6,
        "blob_radius": 3,
    },
}
"""name -> `finish_map`'s arguments."""


def time_finish(stitched: np.ndarray, finish: dict[str, Any], repeats: int) -> float:
    """Median milliseconds of one `finish_map(stitched, **finish)` call on ``stitched`` (H, W) float32."""
    finish_map(stitched, **finish)  # warm-up: kernels built and cached
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        finish_map(stitched, **finish)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def run(size: int, threads: int, repeats: int) -> dict[str, Any]:
    """Every finish of `FINISHES` timed on one random map."""
    torch.set_num_threads(threads)
    stitched = np.random.default_rng(0).random((size, size), dtype=np.float32) - 0.5  # signed: finishes may rectify
    ms = {name: round(time_finish(stitched, finish, repeats), 1) for name, finish in FINISHES.items()}
    return {"size": size, "threads": threads, "repeats": repeats, "ms_per_map": ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.size < 16 or args.threads < 1 or args.repeats < 1:
        got = f"{args.size}, {args.threads}, {args.repeats}"
        parser.error(f"need --size >= 16, --threads >= 1 and --repeats >= 1, got {got}")
    emit_json(run(args.size, args.threads, args.repeats), args.json)


if __name__ == "__main__":
    main()
