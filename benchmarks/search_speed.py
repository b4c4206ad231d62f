"""How much faster is encoder mode than the paper's latent search? Time `PatchModel.score_patches` both ways.

Untrained weights of the demo architecture (`TrainConfig.demo()`: P = 64, Z = 128, base 16): speed does not
depend on training. Prints JSON: seconds per batch of ``--patches`` patches for encoder mode, encoder mode
with refinement, and search mode with Γ = ``--steps``, and the speed-up of encoder over search. A search is
Γ times one step, so ``--search-patches`` may time it on fewer patches and scale per patch.

Example (one core: about 6 CPU-minutes, mostly the search of 32 patches; all 256 would take about 10)::

    .venv/bin/python benchmarks/search_speed.py --patches 256 --steps 500 --search-patches 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas import AbnormalPatchSource
from trainer.config import TrainConfig
from trainer.networks import DiscriminatorHead, build_networks
from trainer.pipeline import PROVISIONAL_THRESHOLDS, build_card
from trainer.scoring import PatchModel


def _seconds(model: PatchModel, patches: np.ndarray, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one `score_patches` call, the best of ``repeats``: CPU time is what a shared
    machine does not distort (with one torch thread it is the compute time)."""
    model.score_patches(patches[:2])  # warm-up (lazy imports, allocator)
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        model.score_patches(patches)
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.demo()
    card = build_card(cfg, "bench", "v-bench", AbnormalPatchSource.NONE, PROVISIONAL_THRESHOLDS, "bench", 0, 0)
    torch.manual_seed(0)
    head = DiscriminatorHead(cfg.discriminator_head)
    nets = build_networks(cfg.patch_size, cfg.latent_dim, cfg.base_channels, cfg.spectral_norm, head)
    state = {
        f"{prefix}.{key}": value
        for prefix, net in zip(("generator", "discriminator", "encoder"), nets, strict=True)
        for key, value in net.state_dict().items()
    }
    patches = np.random.default_rng(0).random((args.patches, cfg.patch_size, cfg.patch_size), dtype=np.float32)
    n_search = min(args.search_patches or args.patches, args.patches)

    def build(**overrides: object) -> PatchModel:
        return PatchModel.from_state(card, state, device="cpu", **overrides)  # type: ignore[arg-type]

    encoder = _seconds(build(), patches, args.repeats)
    refined = {steps: _seconds(build(refine_steps=steps), patches, 1) for steps in args.refine_steps if steps > 0}
    scale = args.patches / n_search
    search = tuple(
        t * scale for t in _seconds(build(score_mode="search", search_steps=args.steps), patches[:n_search], 1)
    )
    return {
        "device": "cpu",
        "threads": args.threads,
        "patch_size": cfg.patch_size,
        "latent_dim": cfg.latent_dim,
        "base_channels": cfg.base_channels,
        "patches": args.patches,
        "search_steps": args.steps,
        "search_patches_timed": n_search,
        "encoder_s_per_batch": {"wall": round(encoder[0], 3), "cpu": round(encoder[1], 3)},
        "refine_s_per_batch": {
            str(steps): {"wall": round(wall, 2), "cpu": round(cpu, 2)} for steps, (wall, cpu) in refined.items()
        },
        "search_s_per_batch": {"wall": round(search[0], 1), "cpu": round(search[1], 1)},
        "search_cpu_ms_per_patch_step": round(1e3 * search[1] / args.patches / (args.steps + 1), 3),
        "speedup_encoder_vs_search": {
            "wall": round(search[0] / encoder[0], 1),
            "cpu": round(search[1] / encoder[1], 1),
        },
    }


def main() -> None:
    """Parse arguments, time, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=256, help="patches per batch")
    parser.add_argument("--steps", type=int, default=500, help="Γ, latent search steps")
    parser.add_argument("--search-patches", type=int, default=0, help="time the search on this many (0 = all)")
    parser.add_argument("--refine-steps", type=int, nargs="*", default=[10], help="encoder refinement steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="encoder timings (the best is kept)")
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
