"""What `trainer.grain` reads on surfaces whose grain is known: along x, along y, diagonal, or none.

The synthetic brushed metal (grain along x), the same images transposed (along y), rotated by 10°, 20°
and 45° (centre crops: grains the flattening cannot follow exactly), and blurred white noise (no grain,
σ = 2 px)::

    python benchmarks/grain.py --sizes 256 1024 --seeds 0 1 2 --json /tmp/grain.json

Prints JSON: per surface and size, R_y / R_x of each seed and the axis `find_grain` chooses from all of
them; and the seconds `find_grain` takes on `MAX_SAMPLED_IMAGES` images of the largest size.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, rotate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_output import emit_json
from trainer.grain import MAX_SAMPLED_IMAGES, anisotropy, find_grain
from trainer.synthetic import DefectKind, synth_image

SIGMA = 12.0
"""The demo schedule's flattening σ, which `anomap train` measures the grain with."""


def _metal(seed: int, size: int) -> np.ndarray:
    return synth_image(seed, size, [DefectKind.SCRATCH])[0]


def _rotated(angle: float) -> Callable[[int, int], np.ndarray]:
    """The metal of twice the size rotated by ``angle`` degrees, centre (size, size) crop: no border."""

    def make(seed: int, size: int) -> np.ndarray:
        turned = rotate(_metal(seed, 2 * size).astype(np.float32), angle, reshape=False, order=1, mode="reflect")
        lo = size // 2
        return np.clip(np.rint(turned[lo : lo + size, lo : lo + size]), 0, 255).astype(np.uint8)

    return make


def _isotropic(seed: int, size: int) -> np.ndarray:
    field = gaussian_filter(np.random.default_rng(seed).standard_normal((size, size)), 2.0)
    return np.clip(128 + 40 * field / field.std(), 0, 255).astype(np.uint8)


SURFACES: dict[str, Callable[[int, int], np.ndarray]] = {
    "metal_along_x": _metal,
    "metal_transposed_along_y": lambda seed, size: _metal(seed, size).T.copy(),
    "metal_rotated_10": _rotated(10.0),
    "metal_rotated_20": _rotated(20.0),
    "metal_rotated_45": _rotated(45.0),
    "isotropic_noise": _isotropic,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    rows = []
    for name, make in SURFACES.items():
        for size in args.sizes:
            images = [make(seed, size) for seed in args.seeds]
            grain = find_grain(images, SIGMA)
            ratios = [round(anisotropy(image, SIGMA), 3) for image in images]
            rows.append({"surface": name, "size": size, "ratios": ratios, "axis": str(grain.axis or "none")})
    largest = max(args.sizes)
    images = [_metal(seed, largest) for seed in range(MAX_SAMPLED_IMAGES)]
    start = time.perf_counter()
    find_grain(images, SIGMA)
    seconds = time.perf_counter() - start
    emit_json(
        {
            "sigma": SIGMA,
            "surfaces": rows,
            "find_grain_seconds": {"size": largest, "images": len(images), "seconds": round(seconds, 3)},
        },
        args.json,
    )


if __name__ == "__main__":
    main()
