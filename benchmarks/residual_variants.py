"""One run of the paper's experiment, its maps made several ways from the same reconstructions.

Trains one model of `benchmarks/quality.py`'s grid (the same data, seeds and schedule; one ε, k, γ,
seed) with optional `TrainConfig` overrides (``--set base_channels=32``), then reconstructs every
test image's patches once, G(E(x)), and scores maps built from them in several ways. Prints JSON: the
four metrics per variant, the mean |x − G(E(x))| over the test patches, and the share of training
crops that touch a defect (`trainer.patches.patch_contamination`)::

    python benchmarks/residual_variants.py --seed 0 --epsilon 0.1 --set base_channels=32 --json /tmp/rv.json

Variants (each then smoothed with the card's σ, as the product does):

- ``residual``: |x − G(E(x))| per patch, stitched (the product's map);
- ``signed_stitch``: x − G(E(x)) stitched, then | · |: overlapping reconstructions averaged first;
- ``highpass_3`` / ``highpass_6``: the signed stitch minus its Gaussian blur (σ 3 or 6 px), then | · |:
  slow reconstruction errors removed, 1–2 px grooves kept;
- ``ssim``: 1 − SSIM(x, G(E(x))) per patch (σ = 1.5 windows), stitched;
- ``ssim_x_residual``: the product of the two stitched maps;
- ``ssim_residual``: |x − G(E(x))| × (1 − SSIM) per patch, then stitched: the product's
  ``MapMode.SSIM_RESIDUAL`` (`trainer.patch_filters.ssim_dissimilarity`, as a scorer computes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_output import emit_json
from quality import abnormal_bank, bench_config, card_for, dataset, evaluate, quick_grid
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.gan import train_in_process
from trainer.patch_filters import ssim_dissimilarity as patch_ssim_dissimilarity
from trainer.patches import as_unit_float, patch_contamination
from trainer.scoring import PatchModel
from trainer.tiling import TileLayout, extract_patches, plan_tiles, stitch_patches

SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2


def ssim_dissimilarity(x: np.ndarray, y: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """1 − SSIM of patches (N, P, P) in [0, 1] against (N, P, P), Gaussian windows of ``sigma`` -> (N, P, P)."""

    def window(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=(0, sigma, sigma), mode="reflect")

    mx, my = window(x), window(y)
    vx, vy, cxy = window(x * x) - mx**2, window(y * y) - my**2, window(x * y) - mx * my
    ssim = ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / ((mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2))
    return (1.0 - ssim).astype(np.float32)


def variant_maps(patches: np.ndarray, reconstructions: np.ndarray, layout: TileLayout) -> dict[str, np.ndarray]:
    """Every variant's unsmoothed (H, W) map from patches and their reconstructions (N, P, P) in [0, 1]."""
    residual = patches - reconstructions
    absolute = stitch_patches(np.abs(residual), layout)
    signed = stitch_patches(residual, layout)
    ssim = stitch_patches(ssim_dissimilarity(patches, reconstructions), layout)
    x, rec = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None] for a in (patches, reconstructions))
    patch_ssim = patch_ssim_dissimilarity(x, rec)[:, 0].numpy()
    return {
        "residual": absolute,
        "signed_stitch": np.abs(signed),
        "highpass_3": np.abs(signed - gaussian_filter(signed, 3, mode="reflect")),
        "highpass_6": np.abs(signed - gaussian_filter(signed, 6, mode="reflect")),
        "ssim": ssim,
        "ssim_x_residual": ssim * absolute,
        "ssim_residual": stitch_patches(np.abs(residual) * patch_ssim, layout),
    }


def reconstruct(model: PatchModel, patches: np.ndarray, batch: int = 256) -> np.ndarray:
    """G(E(x)) of patches (N, P, P) in [0, 1], in batches -> (N, P, P) float32 in intensity units."""
    return np.concatenate([model.reconstruct(patches[i : i + batch]) for i in range(0, len(patches), batch)])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the one run, then score every variant on its test images."""
    torch.set_num_threads(args.threads)
    grid = dataclasses.replace(  # the --quick grid's data sizes, narrowed to this one run
        quick_grid(),
        size=args.size,
        epsilons=(args.epsilon,),
        ks=(args.k,),
        seeds=(args.seed,),
        overrides=tuple(args.overrides.items()),
        contamination_density=args.contamination_density,
    )
    data = dataset(grid, args.epsilon, args.seed)
    cfg = grid.config(args.gamma, args.seed)
    bank, source = abnormal_bank(data, args.k if args.gamma < 1 else 0, cfg)
    started = time.perf_counter()
    state = train_in_process(cfg, data.train_normal, bank, device="cpu")
    train_s = time.perf_counter() - started
    model = PatchModel.from_state(card_for(cfg, source), state, device="cpu")

    def smooth(amap: np.ndarray) -> np.ndarray:
        return gaussian_filter(amap, cfg.smoothing_sigma, mode="reflect").astype(np.float32)

    maps: dict[str, list[np.ndarray]] = {}
    residuals = []
    for image in data.test_images:
        unit = cfg.detrend(as_unit_float(image))  # what the model sees (σ = 0: the image itself)
        layout = plan_tiles(unit.shape[0], unit.shape[1], cfg.patch_size, cfg.stride)
        patches = extract_patches(unit, layout)
        reconstructions = reconstruct(model, patches)
        residuals.append(float(np.abs(patches - reconstructions).mean()))
        for name, amap in variant_maps(patches, reconstructions, layout).items():
            maps.setdefault(name, []).append(smooth(amap))
    return {
        "seed": args.seed,
        "epsilon": args.epsilon,
        "gamma": args.gamma,
        "k": args.k if args.gamma < 1 else 0,
        "size": args.size,
        "contamination_density": args.contamination_density,
        "overrides": args.overrides,
        "patch_contamination": round(patch_contamination(data.train_masks, cfg.patch_size), 4),
        "train_s": round(train_s, 1),
        "mean_abs_residual": round(float(np.mean(residuals)), 5),
        "variants": {name: evaluate(variant, data) for name, variant in maps.items()},
    }


def _override(text: str) -> tuple[str, Any]:
    """``name=value`` for a `TrainConfig` field, the value parsed as that field's type."""
    name, sep, value = text.partition("=")
    config = bench_config()
    if not sep or name not in {f.name for f in dataclasses.fields(config)}:
        msg = f"expected FIELD=VALUE with a TrainConfig field, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    current = getattr(config, name)
    if isinstance(current, bool):  # bool("false") would be True
        return name, value.lower() in {"1", "true", "yes"}
    return name, value if isinstance(current, str) else type(current)(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=5, help="confirmed abnormal images (γ < 1 only)")
    parser.add_argument("--contamination-density", type=int, default=1)
    parser.add_argument("--set", type=_override, nargs="*", default=[], help="TrainConfig overrides FIELD=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.gamma < 1 and args.k < 1:
        parser.error(f"--gamma {args.gamma} < 1 needs --k >= 1 confirmed abnormal images, got {args.k}")
    args.overrides = dict(args.set)
    emit_json(run(args), args.json)


if __name__ == "__main__":
    main()
