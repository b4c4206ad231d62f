"""The paper's experiment: Noisy-AnoGAN (γ < 1 plus k confirmed abnormal images) against plain AnoGAN (γ = 1).

On synthetic brushed metal whose "normal" training set carries unlabelled scratches in a fraction ε of
its images, train both on the same data, seeds and schedule, then score held-out test images and
report image AUROC, pixel AUROC, pixel AP and AUPRO (mean and spread over seeds) per (ε, k)::

    python benchmarks/quality.py --quick --json /tmp/q.json              # <= 10 min on 2 cores
    python benchmarks/quality.py --json /tmp/full.json --write-docs      # the full grid (hours on CPU)

k = 0 has no abnormal images, so the γ < 1 objective has nothing to push away from and is the plain
objective exactly (trainer/losses.py): that row is reported once, not trained twice. For k > 0 every
γ in ``--gammas`` is trained and the best by mean pixel AP is reported (chosen on the test images:
optimistic for both columns alike only if plain had a choice too, so the chosen γ is printed).

Also measures encoder mode against the paper's latent search (``ScoreMode.SEARCH``) on the same
weights: seconds per image and, with ``--search-images N``, the metrics of both modes on N test images;
``--compare-refine 5 10`` adds encoder mode refined by that many latent steps from E(x) to the comparison.
Every training run is its own process with one torch thread; ``--jobs`` run at once. Maps are made and
finished as the card says (the demo: signed residuals, line-filtered); each run also reports the same
weights' maps made the earlier ways (`COMPARED_MAPS`) where they differ from the card's:
``gaussian_finish`` (``ssim_residual`` maps, Gaussian σ = 2), ``line_finish`` (``ssim_residual``, the
15 px line filter on magnitudes) and ``signed_finish`` (signed residuals, 15 px segments alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas import AbnormalPatchSource, ModelCard, ScoreMode
from schemas.model_card import MapMode
from trainer.config import TrainConfig, map_finish_overrides
from trainer.gan import train_in_process
from trainer.line_filter import GAUSSIAN_FINISH_SIGMA
from trainer.metrics import aupro, image_auroc, pixel_auroc, pixel_average_precision
from trainer.patches import abnormal_patch_bank, as_unit_float, patch_contamination
from trainer.pipeline import PROVISIONAL_THRESHOLDS, build_card
from trainer.postprocess import image_score
from trainer.scoring import PatchModel, anomaly_map, finish_card_map, stitched_map
from trainer.synthetic import DefectKind, SyntheticDataset, make_dataset
from trainer.tiling import extract_patches, plan_tiles

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
_NO_SHAPES = {"short_segment_weight": 0.0, "blob_radius": 0}
COMPARED_MAPS: dict[str, dict[str, Any]] = {
    "gaussian_finish": {"map_mode": MapMode.SSIM_RESIDUAL, "smoothing_sigma": GAUSSIAN_FINISH_SIGMA, "line_length": 0}
    | _NO_SHAPES,
    "line_finish": {"map_mode": MapMode.SSIM_RESIDUAL, "smoothing_sigma": 0.0, "line_length": 15} | _NO_SHAPES,
    "signed_finish": {"map_mode": MapMode.SIGNED_RESIDUAL, "smoothing_sigma": 0.7, "line_length": 15} | _NO_SHAPES,
}
"""Earlier ways to make maps from the same weights, reported beside the card's: ``ssim_residual`` patch maps
finished with a Gaussian σ = 2 (before the line filter), with the line filter on magnitudes (before signed
residuals), and signed residuals with 15 px segments alone (before half-length segments and discs)."""
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADLINE = (0.1, 5)
"""The (ε, k) of the issue's targets: the top-level ``plain`` / ``noisy`` keys of the JSON."""
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


@dataclass(frozen=True)
class Grid:
    """What to train: every (ε, seed) gets one plain run and, per k > 0, one run per γ < 1."""

    size: int
    epsilons: tuple[float, ...]
    ks: tuple[int, ...]
    gammas: tuple[float, ...]
    seeds: tuple[int, ...]
    n_train: int
    n_test_normal: int
    n_test_defect: int
    overrides: tuple[tuple[str, Any], ...] = ()
    kinds: tuple[DefectKind, ...] = (DefectKind.SCRATCH,)
    """The defects of the contaminated training images, the abnormal images and the defective test images."""
    contamination_density: int = 1
    """Draws of each kind per contaminated training image (`make_dataset`): > 1 contaminates more patches."""

    def config(self, gamma: float, seed: int) -> TrainConfig:
        """The one schedule every run shares; only γ and the seed differ."""
        return bench_config(gamma=gamma, seed=seed, **dict(self.overrides))


@dataclass(frozen=True)
class Run:
    """One training run of the grid (k = 0 for the plain γ = 1 runs)."""

    epsilon: float
    k: int
    gamma: float
    seed: int


def bench_config(**overrides: Any) -> TrainConfig:
    """The benchmark's model and schedule: the product demo's (`TrainConfig.demo`), in one process."""
    values: dict[str, Any] = {"num_workers": 1}
    return TrainConfig.demo(**(values | overrides))


def dataset(grid: Grid, epsilon: float, seed: int) -> SyntheticDataset:
    """The data of one (ε, seed): the same for the plain and every noisy run."""
    return make_dataset(
        size=grid.size,
        n_train=grid.n_train,
        contamination=epsilon,
        n_abnormal=max(grid.ks),
        n_calibration=0,
        n_test_normal=grid.n_test_normal,
        n_test_defect=grid.n_test_defect,
        seed=seed,
        kinds=grid.kinds,
        contamination_density=grid.contamination_density,
    )


def abnormal_bank(data: SyntheticDataset, k: int, cfg: TrainConfig) -> tuple[np.ndarray | None, AbnormalPatchSource]:
    """The masked patches of the first ``k`` abnormal images, flattened as ``cfg`` trains (None for k = 0)."""
    if k < 1:
        return None, AbnormalPatchSource.NONE
    images, masks = data.abnormal[:k], data.abnormal_masks[:k]
    return abnormal_patch_bank(images, masks, cfg.patch_size, cfg.stride, with_masks=True, detrend=cfg.detrend)


def card_for(cfg: TrainConfig, source: AbnormalPatchSource) -> ModelCard:
    """A model card for scoring in-process (provisional thresholds: the metrics do not use them)."""
    return build_card(cfg, "quality", "v-bench", source, PROVISIONAL_THRESHOLDS, "bench", 0, 0)


def evaluate(maps: Sequence[np.ndarray], data: SyntheticDataset) -> dict[str, float]:
    """The four metrics of maps (one (H, W) per test image) against the dataset's masks and labels."""
    return evaluate_maps(maps, data.test_masks, data.test_labels)


def evaluate_maps(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], labels: Sequence[str]) -> dict[str, float]:
    """The four metrics of maps against their (H, W) bool masks and labels (``"good"`` or a defect kind)."""
    defective = [label != "good" for label in labels]
    return {
        "image_auroc": round(image_auroc([image_score(m) for m in maps], defective), 4),
        "pixel_auroc": round(pixel_auroc(maps, masks), 4),
        "pixel_ap": round(pixel_average_precision(maps, masks), 4),
        "aupro": round(aupro(maps, masks), 4),
    }


def train_and_score(grid: Grid, run: Run, keep_weights: Path | None = None) -> dict[str, Any]:
    """Train one run of the grid in this process and score its test images (worker process entry point).

    With ``keep_weights`` the trained weights are also saved there (safetensors) for the search comparison.
    """
    torch.set_num_threads(1)
    data = dataset(grid, run.epsilon, run.seed)
    cfg = grid.config(run.gamma, run.seed)
    bank, source = abnormal_bank(data, run.k, cfg)
    started = time.perf_counter()
    state = train_in_process(cfg, data.train_normal, bank, device="cpu")
    train_s = time.perf_counter() - started
    if keep_weights is not None:
        save_file(state, str(keep_weights))
    card = card_for(cfg, source)
    model = PatchModel.from_state(card, state, device="cpu")
    started = time.perf_counter()
    stitched = [stitched_map(image, model) for image in data.test_images]
    maps = [finish_card_map(raw, card) for raw in stitched]  # what `anomaly_map` does, the stitched kept
    score_s = (time.perf_counter() - started) / len(maps)
    out: dict[str, Any] = asdict(run) | evaluate(maps, data) | compared_maps(card, state, data, stitched)
    out["patch_contamination"] = round(patch_contamination(data.train_masks, cfg.patch_size), 4)
    bank_size = 0 if bank is None else len(bank)
    return out | {"train_s": round(train_s, 1), "encoder_s_per_image": round(score_s, 3), "bank": bank_size}


def compared_maps(
    card: ModelCard, state: dict[str, torch.Tensor], data: SyntheticDataset, card_stitched: list[np.ndarray]
) -> dict[str, Any]:
    """The metrics of `COMPARED_MAPS` that differ from ``card``'s maps, from the same weights ({name: metrics}).

    ``card_stitched`` are the test images' stitched maps in the card's map mode, finished anew where only the
    finish differs; other map modes are stitched here, once each.
    """
    out: dict[str, Any] = {}
    stitched: dict[MapMode, list[np.ndarray]] = {card.map_mode: card_stitched}
    for name, settings in COMPARED_MAPS.items():
        variant = card.model_copy(update=settings)
        if all(getattr(variant, key) == getattr(card, key) for key in settings):
            continue
        if variant.map_mode not in stitched:
            model = PatchModel.from_state(variant, state, device="cpu")
            stitched[variant.map_mode] = [stitched_map(image, model) for image in data.test_images]
        out[name] = evaluate([finish_card_map(raw, variant) for raw in stitched[variant.map_mode]], data)
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def _compared_maps(rows: list[dict[str, Any]], eps: float, k: int, gamma: float) -> dict[str, Any]:
    """Mean metrics of every `COMPARED_MAPS` variant for plain and for ``gamma``'s runs, as
    ``plain_<name>`` / ``noisy_<name>`` (absent where no run has that variant)."""
    out: dict[str, Any] = {}
    for side, key in (("plain", (eps, 0, 1.0)), ("noisy", (eps, k if gamma < 1 else 0, gamma))):
        same = [r for r in rows if (r["epsilon"], r["k"], r["gamma"]) == key]
        for name in COMPARED_MAPS:
            finished = [r[name] for r in same if name in r]
            if finished:
                out[f"{side}_{name}"] = {m: round(statistics.fmean(f[m] for f in finished), 4) for m in METRICS}
    return out


def summarize(rows: list[dict[str, Any]], grid: Grid) -> list[dict[str, Any]]:
    """Per (ε, k): plain and the best γ < 1 (by mean pixel AP), each metric as mean/std/min/max/n over seeds."""
    table = []
    for eps in grid.epsilons:
        plain_rows = [r for r in rows if r["epsilon"] == eps and r["gamma"] == 1.0]
        plain = {m: _spread([r[m] for r in plain_rows]) for m in METRICS}
        for k in grid.ks:
            best_gamma, noisy = 1.0, plain
            if k > 0:
                by_gamma = {
                    g: {
                        m: _spread([r[m] for r in rows if (r["epsilon"], r["k"], r["gamma"]) == (eps, k, g)])
                        for m in METRICS
                    }
                    for g in grid.gammas
                }
                best_gamma = max(by_gamma, key=lambda g: by_gamma[g]["pixel_ap"]["mean"])
                noisy = by_gamma[best_gamma]
            row = {"epsilon": eps, "k": k, "gamma": best_gamma, "plain": plain, "noisy": noisy}
            table.append(row | _compared_maps(rows, eps, k, best_gamma))
    return table


def search_comparison(
    grid: Grid,
    run: Run,
    weights: Path,
    n_images: int,
    image_size: int,
    search_steps: int,
    n_patches: int = 16,
    refine: Sequence[int] = (),
) -> dict[str, Any]:
    """Encoder mode against latent search on the same weights (``run``'s, saved at ``weights``).

    Speed: seconds per ``grid.size``² image; the search's is measured on ``n_patches`` patches of a
    test image and scaled to the image's patch count (the search is per patch: its cost is linear in
    patches). Quality: with ``n_images`` > 1, both modes score that many test images of size
    ``image_size`` (one good, the rest defective; a CPU cannot search whole 1024² images in a benchmark).
    Each step count in ``refine`` adds encoder mode with that many latent refinement steps from E(x)
    (``out["refine"][steps]``: its speed, its speedup over the search and, with images, its metrics).
    """
    torch.set_num_threads(1)
    cfg = grid.config(run.gamma, run.seed)
    state = load_file(str(weights))
    card = card_for(cfg, AbnormalPatchSource.MASK)
    encoder = PatchModel.from_state(card, state, device="cpu")
    search = PatchModel.from_state(card, state, device="cpu", score_mode=ScoreMode.SEARCH, search_steps=search_steps)
    image = dataset(grid, run.epsilon, run.seed).test_images[-1]
    started = time.perf_counter()
    anomaly_map(image, encoder)
    encoder_s = time.perf_counter() - started
    layout = plan_tiles(image.shape[0], image.shape[1], cfg.patch_size, cfg.stride)
    patches = extract_patches(cfg.detrend(as_unit_float(image)), layout)
    search.score_patches(patches[:2])  # warm-up: the first Adam step imports torch._dynamo
    started = time.perf_counter()
    search.score_patches(patches[:n_patches])
    search_s = (time.perf_counter() - started) / n_patches * len(patches)
    out: dict[str, Any] = {
        "search_steps": search_steps,
        "patches_per_image": len(patches),
        "encoder_s_per_image": round(encoder_s, 3),
        "search_s_per_image": round(search_s, 1),
        "speedup_encoder_vs_search": round(search_s / encoder_s, 1),
    }
    refined = {steps: PatchModel.from_state(card, state, device="cpu", refine_steps=steps) for steps in refine}
    for steps, model in refined.items():
        started = time.perf_counter()
        anomaly_map(image, model)
        refine_s = time.perf_counter() - started
        out.setdefault("refine", {})[str(steps)] = {
            "s_per_image": round(refine_s, 3),
            "speedup_vs_search": round(search_s / refine_s, 1),
        }
    if n_images > 1:
        small = make_dataset(
            size=image_size,
            n_train=0,
            contamination=0.0,
            n_abnormal=0,
            n_calibration=0,
            n_test_normal=1,
            n_test_defect=n_images - 1,
            seed=1000 + run.seed,
        )
        for name, model in (("encoder", encoder), ("search", search)):
            started = time.perf_counter()
            out[name] = evaluate([anomaly_map(im, model) for im in small.test_images], small)
            out[name]["s_per_image"] = round((time.perf_counter() - started) / n_images, 2)
        for steps, model in refined.items():
            started = time.perf_counter()
            metrics = evaluate([anomaly_map(im, model) for im in small.test_images], small)
            metrics["small_s_per_image"] = round((time.perf_counter() - started) / n_images, 2)
            out["refine"][str(steps)] |= metrics
        out["search_images"] = {"n": n_images, "size": image_size}
    return out


def grid_runs(grid: Grid) -> list[Run]:
    """Every training run of the grid: plain per (ε, seed), then γ < 1 per (ε, k > 0, γ, seed)."""
    runs = [Run(eps, 0, 1.0, seed) for eps in grid.epsilons for seed in grid.seeds]
    runs += [
        Run(eps, k, gamma, seed)
        for eps in grid.epsilons
        for k in grid.ks
        if k > 0
        for gamma in grid.gammas
        for seed in grid.seeds
    ]
    return runs


def markdown(table: list[dict[str, Any]]) -> str:
    """The summary as a markdown table: mean ± std over seeds, plain | noisy, per (ε, k)."""
    head = "| ε | k | best γ | " + " | ".join(f"{m} plain | {m} noisy" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(METRICS))]
    for row in table:
        cells = [f"{row['epsilon']:g}", str(row["k"]), f"{row['gamma']:g}"]
        for m in METRICS:
            for side in ("plain", "noisy"):
                s = row[side][m]
                cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace the block between the quality markers in docs/benchmarks.md (append it when absent)."""
    doc = path.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def quick_grid() -> Grid:
    """The --quick variant: 256² images, ε = 0.1, k = 5, γ ∈ {1, 0.9}, two seeds."""
    return Grid(
        size=256, epsilons=(0.1,), ks=(5,), gammas=(0.9,), seeds=(0, 1), n_train=20, n_test_normal=4, n_test_defect=8
    )


def full_grid(args: argparse.Namespace) -> Grid:
    """The issue's grid, sized by the command line."""
    return Grid(
        size=args.size,
        epsilons=tuple(args.epsilons),
        ks=tuple(args.ks),
        gammas=tuple(args.gammas),
        seeds=tuple(args.seeds),
        n_train=args.n_train,
        n_test_normal=args.n_test_normal,
        n_test_defect=args.n_test_defect,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256², ε = 0.1, k = 5, 2 seeds: <= 10 min on 2 cores")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--write-docs", action="store_true", help="put the markdown table into docs/benchmarks.md")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.9, 0.8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test-normal", type=int, default=6)
    parser.add_argument("--n-test-defect", type=int, default=10)
    parser.add_argument("--search-steps", type=int, default=500, help="Γ of the latent search (AnoGAN: 500)")
    parser.add_argument("--search-images", type=int, default=0, help="images scored in both modes (0 = speed only)")
    parser.add_argument("--search-size", type=int, default=128, help="their size (the search is slow on a CPU)")
    parser.add_argument(
        "--compare-refine",
        type=int,
        nargs="*",
        default=[],
        metavar="STEPS",
        help="also compare encoder mode with this many latent refinement steps (each count) against the search",
    )
    parser.add_argument("--gan-steps", type=int, help="override the schedule (the same for every run)")
    parser.add_argument("--encoder-steps", type=int, help="override the schedule (the same for every run)")
    parser.add_argument("--refine-steps", type=int, help="encoder mode: latent refinement steps at inference")
    parser.add_argument("--base-channels", type=int, help="override the networks' width (every run; demo: 16)")
    parser.add_argument("--discriminator-head", choices=["global", "dense"], help="override the model (every run)")
    parser.add_argument("--map-mode", help="override how a patch's map is made (every run; see schemas.MapMode)")
    parser.add_argument(
        "--detrend-sigma", type=float, help="override the input flattening along the grain (px; 0 = off; demo: 12)"
    )
    parser.add_argument("--detrend-axis", choices=["x", "y", "xy"], help="override the grain's direction (demo: x)")
    parser.add_argument("--line-length", type=int, help="override the maps' line filter (px; 0 = off; demo: 15)")
    parser.add_argument("--smoothing-sigma", type=float, help="override the maps' Gaussian σ (px; demo: 0.7)")
    parser.add_argument(
        "--short-segment-weight", type=float, help="override the line filter's half-length segments (demo: 0.6)"
    )
    parser.add_argument("--blob-radius", type=int, help="override the line filter's disc (px; 0 = off; demo: 3)")
    parser.add_argument(
        "--defects", nargs="+", choices=[str(kind) for kind in DefectKind], help="defect kinds (default: scratch)"
    )
    parser.add_argument(
        "--contamination-density",
        type=int,
        default=1,
        help="defect draws per contaminated training image (8: ~75 %% of its 256² patches touch one, 1: ~25 %%)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="training processes at once")
    args = parser.parse_args()
    if any(steps < 1 for steps in args.compare_refine):
        parser.error(f"--compare-refine takes step counts >= 1, got {args.compare_refine}")
    if args.contamination_density < 1:
        parser.error(f"--contamination-density must be >= 1, got {args.contamination_density}")
    grid = quick_grid() if args.quick else full_grid(args)
    overrides = {"gan_steps": args.gan_steps, "encoder_steps": args.encoder_steps, "refine_steps": args.refine_steps}
    overrides |= {"discriminator_head": args.discriminator_head, "map_mode": args.map_mode}
    overrides |= {"base_channels": args.base_channels}
    overrides |= {"detrend_sigma": args.detrend_sigma, "detrend_axis": args.detrend_axis}
    overrides |= map_finish_overrides(
        args.line_length, args.smoothing_sigma, args.short_segment_weight, args.blob_radius
    )
    grid = dataclasses.replace(grid, overrides=tuple((k, v) for k, v in overrides.items() if v is not None))
    if args.defects:
        grid = dataclasses.replace(grid, kinds=tuple(DefectKind(kind) for kind in args.defects))
    grid = dataclasses.replace(grid, contamination_density=args.contamination_density)
    grid.config(1.0, 0)  # a bad override fails here, with TrainConfig's message, before any run starts
    runs = grid_runs(grid)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    headline_run = next((r for r in runs if (r.epsilon, r.k) == HEADLINE and r.gamma < 1), runs[-1])
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        weights = Path(tmp) / "headline.safetensors"
        futures = [pool.submit(train_and_score, grid, run, weights if run == headline_run else None) for run in runs]
        for i, future in enumerate(futures, 1):
            rows.append(future.result())
            elapsed = time.monotonic() - started
            print(f"[{i}/{len(runs)}] {json.dumps(rows[-1])}  ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        search = search_comparison(
            grid,
            headline_run,
            weights,
            args.search_images,
            args.search_size,
            args.search_steps,
            refine=args.compare_refine,
        )
        print(f"search: {json.dumps(search)}", file=sys.stderr, flush=True)
    table = summarize(rows, grid)
    headline = next((r for r in table if (r["epsilon"], r["k"]) == HEADLINE), table[-1])
    result = {
        "plain": {m: headline["plain"][m]["mean"] for m in METRICS},
        "noisy": {m: headline["noisy"][m]["mean"] for m in METRICS},
        "speedup_encoder_vs_search": search["speedup_encoder_vs_search"],
        "search": search,
        "grid": asdict(grid),
        "table": table,
        "runs": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.write_docs:
        write_docs(markdown(table))


if __name__ == "__main__":
    main()
