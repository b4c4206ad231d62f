"""Which finish suits which defect: one model's stitched maps of scratches, spots, cracks and stains, finished
several ways.

Trains the headline run of `benchmarks/quality.py` (1024², ε = 0.1, k = 5, γ = 0.9, the demo schedule; the
same data per seed), stitches the signed residual x − G(E(x)) of its test images once, and scores them
finished each way of `FINISHES`: per defect kind, the four metrics over that kind's defective images plus the
run's good test images. Scratches are the run's own test images; spots, cracks and stains are
``--per-kind`` extra images of each (their own seed, `trainer.synthetic.make_dataset`). One process per seed,
one torch thread each, ``--jobs`` at once::

    python benchmarks/finish_by_defect.py --seeds 0 1 2 --jobs 2 --json /tmp/finish_by_defect.json

Prints JSON: per seed, per finish, per kind, the metrics; and their means over the seeds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_output import emit_json
from quality import METRICS, Grid, Run, abnormal_bank, card_for, dataset, evaluate_maps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.gan import train_in_process
from trainer.scoring import PatchModel, finish_card_map, stitched_map
from trainer.synthetic import DefectKind, SyntheticDataset, make_dataset

FINISHES: dict[str, dict[str, Any]] = {
    "segments_15": {"short_segment_weight": 0.0, "blob_radius": 0},
    "segments_15_7": {"short_segment_weight": 0.6, "blob_radius": 0},
    "segments_15_7_disc_3": {"short_segment_weight": 0.6, "blob_radius": 3},
    "segments_15_7_disc_2": {"short_segment_weight": 0.6, "blob_radius": 2},
}
"""name -> the filter's shapes, put on the run's card (the demo's: 15 px segments of the signed map, then a
Gaussian σ = 0.7). The demo's finish is ``segments_15_7_disc_3``; ``segments_15`` the thirteenth session's."""
EXTRA_KINDS = (DefectKind.SPOT, DefectKind.CRACK, DefectKind.STAIN)
RUN = Run(epsilon=0.1, k=5, gamma=0.9, seed=0)
"""The headline run of `benchmarks/quality.py` (its seed is replaced by each of ``--seeds``)."""


def kind_images(kind: DefectKind, seed: int, size: int, n: int) -> SyntheticDataset:
    """``n`` defective test images of one kind (the dataset's other parts empty), seeded apart from the run's."""
    return make_dataset(
        size=size, n_train=1, contamination=0.0, n_abnormal=0, n_calibration=0, n_test_normal=0,
        n_test_defect=n, seed=seed + 100, kinds=(kind,),
    )  # fmt: skip


def score_seed(seed: int, size: int, per_kind: int) -> dict[str, Any]:
    """Train the headline run for ``seed`` and score every kind under every finish (worker process entry point)."""
    torch.set_num_threads(1)
    grid = Grid(size=size, epsilons=(RUN.epsilon,), ks=(RUN.k,), gammas=(RUN.gamma,), seeds=(seed,), n_train=20,
                n_test_normal=6, n_test_defect=10)  # fmt: skip
    data = dataset(grid, RUN.epsilon, seed)
    cfg = grid.config(RUN.gamma, seed)
    bank, source = abnormal_bank(data, RUN.k, cfg)
    state = train_in_process(cfg, data.train_normal, bank, device="cpu")
    card = card_for(cfg, source)
    model = PatchModel.from_state(card, state, device="cpu")
    good = [i for i, label in enumerate(data.test_labels) if label == "good"]
    sets: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[str]]] = {
        str(DefectKind.SCRATCH): (
            [stitched_map(image, model) for image in data.test_images],
            list(data.test_masks),
            list(data.test_labels),
        )
    }
    good_maps = [sets[str(DefectKind.SCRATCH)][0][i] for i in good]
    good_masks = [data.test_masks[i] for i in good]
    for kind in EXTRA_KINDS:
        extra = kind_images(kind, seed, size, per_kind)
        maps = [stitched_map(image, model) for image in extra.test_images]
        sets[str(kind)] = (
            maps + good_maps,
            list(extra.test_masks) + good_masks,
            list(extra.test_labels) + ["good"] * len(good),
        )
    out: dict[str, Any] = {}
    for name, shapes in FINISHES.items():
        out[name] = {}
        variant = card.model_copy(update=shapes)
        for kind, (maps, masks, labels) in sets.items():
            finished = [finish_card_map(m, variant) for m in maps]
            out[name][kind] = evaluate_maps(finished, masks, labels)
    return {"seed": seed, "finishes": out}


def mean_over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """{finish: {kind: {metric: mean}}} over the seeds' results."""
    first = per_seed[0]["finishes"]
    return {
        name: {
            kind: {m: round(statistics.fmean(r["finishes"][name][kind][m] for r in per_seed), 4) for m in METRICS}
            for kind in kinds
        }
        for name, kinds in first.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--per-kind", type=int, default=4, help="defective images of each extra kind per seed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="seeds trained at once")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.size < 64 or args.per_kind < 1 or args.jobs < 1:
        parser.error(
            f"need --size >= 64, --per-kind >= 1 and --jobs >= 1, got {args.size}, {args.per_kind}, {args.jobs}"
        )
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(score_seed, seed, args.size, args.per_kind) for seed in args.seeds]
        per_seed = [future.result() for future in futures]
    run = {"epsilon": RUN.epsilon, "k": RUN.k, "gamma": RUN.gamma}
    result = {"run": run, "size": args.size, "per_kind": args.per_kind, "seeds": per_seed}
    emit_json(result | {"mean": mean_over_seeds(per_seed)}, args.json)


if __name__ == "__main__":
    main()
