"""Image AUROC of other summaries of the same anomaly maps: the maximum (anomap's image score) against
top-k means, a high percentile, extra smoothing and a line detector.

    python benchmarks/image_score.py --seeds 0 1 --json /tmp/image_score.json

Per seed: one plain run (γ = 1) of `benchmarks/quality.py`'s schedule on its synthetic data
(``--size``² brushed metal, ε = 0.1, 20 training images, ``--n-test`` good and as many scratched
test images), trained in this process on one thread (~3 min at 1024² on machine B), its maps scored
once and every summary computed from them. Prints one JSON object: per seed, the pixel metrics of
the maps and the image AUROC of each summary.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_output import emit_json
from quality import Grid, card_for, dataset, evaluate
from scipy import ndimage

from schemas import AbnormalPatchSource
from trainer.gan import train_in_process
from trainer.metrics import image_auroc
from trainer.scoring import PatchModel, anomaly_map

Summary = Callable[[np.ndarray], float]


def top_k_mean(k: int) -> Summary:
    """The mean of a map's ``k`` largest values."""
    return lambda m: float(np.partition(m.ravel(), -k)[-k:].mean())


def smoothed_max(sigma: float) -> Summary:
    """The maximum after a further Gaussian smoothing of ``sigma`` pixels."""
    return lambda m: float(ndimage.gaussian_filter(m, sigma).max())


def line_max(length: int) -> Summary:
    """The maximum of a running mean of ``length`` pixels along rows or columns."""
    return lambda m: float(
        max(ndimage.uniform_filter1d(m, length, axis=0).max(), ndimage.uniform_filter1d(m, length, axis=1).max())
    )


SUMMARIES: dict[str, Summary] = {
    "max": lambda m: float(m.max()),
    **{f"top{k}_mean": top_k_mean(k) for k in (100, 500, 1000)},
    "p99.99": lambda m: float(np.quantile(m, 0.9999)),
    **{f"smooth{s}_max": smoothed_max(s) for s in (4, 8)},
    "line31_max": line_max(31),
}


def run_seed(size: int, seed: int, n_test: int) -> dict[str, object]:
    """Train the plain run of ``seed``, score its test images, and summarise the maps every way."""
    grid = Grid(
        size=size,
        epsilons=(0.1,),
        ks=(0,),
        gammas=(),
        seeds=(seed,),
        n_train=20,
        n_test_normal=n_test,
        n_test_defect=n_test,
    )
    data = dataset(grid, 0.1, seed)
    cfg = grid.config(1.0, seed)
    state = train_in_process(cfg, data.train_normal, None, device="cpu")
    model = PatchModel.from_state(card_for(cfg, AbnormalPatchSource.NONE), state, device="cpu")
    maps = [anomaly_map(image, model) for image in data.test_images]
    labels = [label != "good" for label in data.test_labels]
    aurocs = {name: round(image_auroc([summary(m) for m in maps], labels), 4) for name, summary in SUMMARIES.items()}
    return {"seed": seed, "metrics_of_maps": evaluate(maps, data), "image_auroc_by_summary": aurocs}


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-test", type=int, default=12, help="good test images, and as many scratched ones")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [run_seed(args.size, seed, args.n_test) for seed in args.seeds]
    emit_json({"image_size": args.size, "n_test_per_class": args.n_test, "runs": runs}, args.json)


if __name__ == "__main__":
    main()
