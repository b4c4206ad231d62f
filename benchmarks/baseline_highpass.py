"""A hand-made yardstick for the anomaly maps: how far does a fixed filter get on the synthetic metal?

Not a model and not part of the product: the map is |image − its Gaussian blur along the brushing
(x)|, smoothed, so the brushing grain (long along x) cancels and anything running across it stays.
It shows what a residual map that reproduced the grain perfectly would score, on the same images the
map-quality experiments use::

    python benchmarks/baseline_highpass.py --size 512 --seed 0

Prints JSON: per filter, pixel AUROC, pixel AP, image AUROC (max of the map), AUPRO.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.metrics import aupro, image_auroc, pixel_auroc, pixel_average_precision
from trainer.synthetic import make_dataset

Filter = Callable[[np.ndarray], np.ndarray]


def filters() -> dict[str, Filter]:
    """Named maps of a (H, W) float32 image in DN -> (H, W) float32."""
    return {
        "isotropic_highpass": lambda x: gaussian_filter(np.abs(x - gaussian_filter(x, 3)), 1),
        "along_brushing_s1": lambda x: gaussian_filter(np.abs(x - gaussian_filter1d(x, 12, axis=1)), 1),
        "along_brushing_s2": lambda x: gaussian_filter(np.abs(x - gaussian_filter1d(x, 12, axis=1)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = make_dataset(
        size=args.size, n_train=0, contamination=0.0, n_abnormal=0, n_test_normal=4, n_test_defect=8, seed=args.seed
    )
    labels = [label != "good" for label in data.test_labels]
    out = {}
    for name, make_map in filters().items():
        maps = [make_map(image.astype(np.float32)) for image in data.test_images]
        out[name] = {
            "pixel_auroc": round(pixel_auroc(maps, data.test_masks), 4),
            "pixel_ap": round(pixel_average_precision(maps, data.test_masks), 4),
            "image_auroc": round(image_auroc([float(m.max()) for m in maps], labels), 4),
            "aupro": round(aupro(maps, data.test_masks), 4),
        }
    print(json.dumps({"size": args.size, "seed": args.seed, "filters": out}, indent=1))


if __name__ == "__main__":
    main()
