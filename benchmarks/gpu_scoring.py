"""Scoring 1024² images on one accelerator in one process: the model's own rate and what the scorer path adds.

A GPU node may hold only torch (the lent H200 has no Ray, Redis or S3 client, and nothing can be
installed there but carried wheels), so this runs without them: the model comes from files, the
code under test is the scorer's (`workers.inspection.score_ranges`) and the ingress's steps::

    python benchmarks/gpu_scoring.py --export .gpu/model                      # here: the demo model to files
    python benchmarks/gpu_scoring.py --model .gpu/model --json /tmp/gpu.json  # there (or --device cpu here)

`benchmarks/gpu_check.sh` is the one command to run on the GPU machine. Measured per 1024² image
(4225 patches of 32² at stride 16), after a warm-up, the device synchronised around every timing:

1. ``forward``: `PatchModel.score_tensor` on patches already on the device, forward passes of each of
   ``--forward`` sizes: the model's rate, the ceiling of every other path;
2. ``scorer``: `score_ranges` on the image's five ranges of ≤ 1024 patches, as a `PatchScorer` replica
   runs them: rows to the device, patches cut there, maps summed into bands there, bands back (forward
   passes of the best size from 1.); ``scorer_serve_sizes``: the same at the Serve app's GPU sizes
   (three ranges of ≤ 2048, passes of ≤ 2048);
3. ``scorer_host_tiling``: the same ranges cut and summed on the host (what a GPU scorer did before the
   sixth session: (n, P, P) patches up, maps down);
4. ``ingress``: adding the bands, smoothing and regions on the host CPU (`finish_inspection`);
5. ``inspector_host`` and ``inspector_ranges``: whole images in one process, the two ways `LocalInspector`
   can take (`trainer.scoring.anomaly_map` on the host; `inspect_in_ranges`, the scorer's way);

and how far the device path's bands are from the host path's on one image (summation order only).
On CUDA, an experiment: ``forward_cuda_graph``, the forward passes of 1. replayed from captured CUDA
graphs (images/s and the largest difference from the eager maps, or why the capture failed).

Prints one JSON object (and writes it with ``--json``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_output import emit_json
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas import ModelCard
from trainer.scoring import PatchModel, anomaly_map, score_in_batches
from trainer.synthetic import DefectKind, synth_image
from trainer.tiling import MapBand
from workers.inspection import (
    CHUNK_PATCHES,
    GPU_CHUNK_PATCHES,
    GPU_FORWARD_PATCHES,
    InspectionPlan,
    finish_inspection,
    inspect_in_ranges,
    plan_inspection,
    score_ranges,
)

CARD_FILE, WEIGHTS_FILE = "card.json", "weights.safetensors"


def export_demo_model(folder: Path) -> ModelCard:
    """Write the demo architecture's untrained, calibrated model (card JSON + safetensors) to ``folder``."""
    from trainer.config import TrainConfig  # the export runs where the whole project is installed
    from trainer.model_io import weights_to_bytes
    from trainer.pipeline import untrained_model

    card, state = untrained_model(TrainConfig.demo(), [synth_image(0, 256)[0]], "gpu-bench")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CARD_FILE).write_text(card.model_dump_json(indent=1))
    (folder / WEIGHTS_FILE).write_bytes(weights_to_bytes(state))
    return card


def load_model(folder: Path, device: str) -> PatchModel:
    """The model `export_demo_model` wrote, on ``device``."""
    card = ModelCard.model_validate_json((folder / CARD_FILE).read_text())
    return PatchModel.from_safetensors(card, (folder / WEIGHTS_FILE).read_bytes(), device=device)


def timed(step: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Seconds per call of ``step`` (one warm-up call, then the mean over ``repeats``), device synchronised."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - start) / repeats


def graphed_forward(model: PatchModel, patches: torch.Tensor, size: int, repeats: int) -> dict[str, Any]:
    """Forward passes of ``size`` patches replayed from one captured CUDA graph (an experiment: the model is
    launch-bound on a GPU): images/s over ``patches`` (one image's, (n, 1, P, P) on the GPU), and the largest
    difference from the eager maps; or why it failed (a failure is a finding, not a crash of the check)."""
    try:
        return _graphed_forward(model, patches, size, repeats)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def _graphed_forward(model: PatchModel, patches: torch.Tensor, size: int, repeats: int) -> dict[str, Any]:
    static_in = patches[:size].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            model.score_tensor(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model.score_tensor(static_in)

    def replay_image() -> None:
        for i in range(0, len(patches), size):
            chunk = patches[i : i + size]
            static_in[: len(chunk)].copy_(chunk)  # a short last pass reuses the graph; its tail is ignored
            graph.replay()

    graph.replay()  # static_in still holds patches[:size]
    diff = float((static_out - model.score_tensor(patches[:size])).abs().max())
    return {"ips": round(1 / timed(replay_image, repeats, model.device), 3), "max_abs_diff": diff}


def measure(model: PatchModel, n_images: int, forward_sizes: list[int], repeats: int) -> dict[str, Any]:
    """Every rate above on ``n_images`` synthetic 1024² images (every other one scratched)."""
    device, card = model.device, model.card
    images = [
        synth_image(s, 1024, (DefectKind.SCRATCH,) if s % 2 else ())[0].astype(np.float32) / 255
        for s in range(n_images)
    ]
    plans = [plan_inspection(image, card, CHUNK_PATCHES, max(forward_sizes)) for image in images]
    n_patches = plans[0].layout.n_patches
    patches = torch.from_numpy(np.concatenate(plans[0].chunks)).to(device)[:, None]

    forward = {}
    for size in forward_sizes:
        seconds = timed(
            lambda size=size: [model.score_tensor(patches[i : i + size]) for i in range(0, n_patches, size)],
            repeats,
            device,
        )
        forward[str(size)] = round(1 / seconds, 3)
    best_forward = max(forward_sizes, key=lambda size: forward[str(size)])

    def score_all(plans: list[InspectionPlan], forward_patches: int) -> None:
        for plan in plans:
            score_ranges(model, plan.ranges, [plan.padded] * len(plan.ranges), forward_patches)

    def host_bands(plan: InspectionPlan) -> list[MapBand]:
        return [r.band(score_in_batches(model, r.cut(plan.padded), best_forward)) for r in plan.ranges]

    def inspector_host() -> None:
        for image in images:
            anomaly_map(image, model, best_forward)

    def inspector_ranges() -> None:
        for image in images:
            inspect_in_ranges(model, image, best_forward)

    def scorer_host_tiling() -> None:
        for plan in plans:
            host_bands(plan)

    serve_plans = [plan_inspection(image, card, GPU_CHUNK_PATCHES, GPU_FORWARD_PATCHES) for image in images]
    bands = score_ranges(model, plans[0].ranges, [plans[0].padded] * len(plans[0].ranges), best_forward)
    band_diff = max(float(np.abs(a.values - b.values).max()) for a, b in zip(bands, host_bands(plans[0]), strict=True))
    ingress_s = timed(lambda: finish_inspection(plans[0], bands, card), repeats * 4, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        model.score_tensor(patches[:64])
    flops = counter.get_total_flops() * n_patches / 64
    return {
        "forward_ips": forward,
        "forward_best_batch": best_forward,
        "scorer_ips": round(n_images / timed(lambda: score_all(plans, best_forward), repeats, device), 3),
        "scorer_serve_sizes_ips": round(
            n_images / timed(lambda: score_all(serve_plans, GPU_FORWARD_PATCHES), repeats, device), 3
        ),
        "forward_cuda_graph": {
            str(size): graphed_forward(model, patches, size, repeats) if device.type == "cuda" else "cpu: not run"
            for size in forward_sizes
        },
        "scorer_host_tiling_ips": round(n_images / timed(scorer_host_tiling, repeats, device), 3),
        "inspector_host_ips": round(n_images / timed(inspector_host, repeats, device), 3),
        "inspector_ranges_ips": round(n_images / timed(inspector_ranges, repeats, device), 3),
        "ingress_ms_per_image": round(ingress_s * 1e3, 2),
        "scorer_vs_host_band_max_abs_diff": band_diff,
        "band_max": max(float(band.values.max()) for band in bands),
        "model_gflop_per_image": round(flops / 1e9, 2),
        "achieved_tflops_forward": round(flops * forward[str(best_forward)] / 1e12, 2),
        "n_patches_per_image": n_patches,
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, help="write the demo model to this folder and stop")
    parser.add_argument("--model", type=Path, help="the folder --export wrote")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward", type=int, nargs="+", default=[512, 1024, 2048, 4225], help="forward-pass sizes")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.export is not None:
        card = export_demo_model(args.export)
        print(f"wrote {card.version} to {args.export}")
        return
    if args.model is None:
        parser.error("give --model FOLDER (written by --export) or --export FOLDER")
    model = load_model(args.model, args.device)
    result = {
        "device": torch.cuda.get_device_name(0) if model.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "map_mode": str(model.card.map_mode),
        **measure(model, args.images, args.forward, args.repeats),
    }
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
