"""Seeded synthetic brushed metal with micro scratches, spots, cracks and stains (method.md §7).

Every image is generated at full size from its own seed (no small texture is ever tiled up), and the
same seed gives the same bytes. Three independent random streams per seed (surface, defects, sensor)
mean that an image with defects is the defect-free image of the same seed plus the defects::

    image, mask = synth_image(7, size=1024, defects=[DefectKind.SCRATCH])   # (1024, 1024) uint8, bool
    data = make_dataset(size=256, n_train=24, contamination=0.1, seed=0)
    write_dataset_folder(data, Path("/tmp/metal"))                          # MVTec-like layout

The surface: a base grey, brushing grain (Gaussian-filtered noise, far longer along x than along y, at
two scales, plus sparse brush lines), a fine isotropic grain and a smooth illumination falloff.
Defects change the surface multiplicatively (a 5 % deep groove darkens it by 5 %); each is
anti-aliased from its point-to-curve distance (to curve samples 0.25 px apart) and its mask is
where its coverage exceeds 0.25. Sensor noise is added last, then the image is rounded to 8 bit.

Typical values (1024²): image mean 105–160 DN, std of a 64×64 patch ≈ 6.6 DN; a scratch changes
its pixels by 3–15 DN and covers 0.01–0.06 % of the image; cracks ≈ 10–25 DN; stains 0.3–1.3 % of
the image at 6–9 DN. About 0.12 s per 1024² image on one CPU core.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from trainer.imaging import encode_png

GENERATOR_VERSION = 1
"""Bump whenever the pictures change: it is part of every dataset digest."""
MASK_COVERAGE = 0.25
_SURFACE, _DEFECTS, _SENSOR = 0, 1, 2


class DefectKind(StrEnum):
    """What can be drawn on the surface."""

    SCRATCH = "scratch"
    """A thin curved groove (quadratic Bézier), 40–400 px long, 0.6–2 px wide, 3–12 % deep."""
    SPOT = "spot"
    """A small pit or speck, 1.5–6 px radius, 6–20 % deep."""
    CRACK = "crack"
    """A jagged dark line, 30–200 px long, 0.8–2 px wide, 12–30 % deep, sometimes branched."""
    STAIN = "stain"
    """An irregular soft blob, 12–50 px radius, 4–10 % darker."""


def _rng(seed: int, stream: int) -> np.random.Generator:
    if seed < 0:
        msg = f"seed must be >= 0, got {seed}"
        raise ValueError(msg)
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _along_x(field: np.ndarray, size: int, step: int) -> np.ndarray:
    """Linearly interpolate a field sampled every ``step`` px along x, (size, size // step + 2), to (size, size)."""
    x = (np.arange(size, dtype=np.float32) + 0.5) / step + 0.5  # coarse coordinate, in [0.5, width - 1.5]
    i0 = x.astype(np.int64)
    w = (x - i0)[None, :]
    out = field[:, i0] * (1.0 - w) + field[:, i0 + 1] * w
    return out / np.float32(out.std() + 1e-12)


def _streaks(
    rng: np.random.Generator, size: int, sigma_y: float, sigma_x: float, step: int, density: float = 1.0
) -> np.ndarray:
    """Unit-variance noise smoothed with sigma (sigma_y, sigma_x) px, (size, size) float32.

    ``density`` < 1 keeps only that fraction of the noise (as ±1 impulses): sparse, distinct streaks.
    The long axis is generated ``step`` times coarser and interpolated linearly: the field is smooth
    over ``sigma_x`` px, so this changes nothing visible and cuts the filter cost by ``step``.
    Filtering wraps around, so the statistics are the same everywhere and no border is mirrored.
    """
    shape = (size, -(-size // step) + 2)
    if density < 1.0:
        noise = (rng.random(shape, dtype=np.float32) < density).astype(np.float32)
        noise *= rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape)
    else:
        noise = rng.standard_normal(shape, dtype=np.float32)
    field = gaussian_filter(noise, sigma=(sigma_y, sigma_x / step), mode="wrap", truncate=3.0)
    return _along_x(field, size, step)


def _surface(seed: int, size: int) -> np.ndarray:
    """The defect-free surface, (size, size) float32 around 0.4–0.65."""
    rng = _rng(seed, _SURFACE)
    base = rng.uniform(0.42, 0.62)
    grain = 0.018 * _streaks(rng, size, 0.7, 24.0, 4)  # brushing, the dominant texture
    grain += 0.012 * _streaks(rng, size, 1.6, 160.0, 16)  # broad bands along the brushing
    grain += 0.013 * _streaks(rng, size, 0.5, 40.0, 4, density=0.004)  # sparse brush lines
    fine = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 0.6, truncate=3.0)
    grain += 0.008 * fine / np.float32(fine.std() + 1e-12)
    yy = (np.arange(size, dtype=np.float32) / np.float32(size))[:, None]  # (S, 1), broadcast below
    xx = yy.T
    cy, cx = rng.uniform(-0.3, 1.3, size=2)
    gy, gx = rng.uniform(-0.06, 0.06, size=2)
    falloff = rng.uniform(0.05, 0.15)
    light = 1.0 + gy * (yy - 0.5) + gx * (xx - 0.5) - falloff * ((yy - cy) ** 2 + (xx - cx) ** 2)
    light /= light.mean()
    return ((base + grain) * light).astype(np.float32)


def _curve_band(
    points: np.ndarray, half_width: np.ndarray, reach: float, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels within ``reach`` px of a densely sampled curve (M, 2) in (y, x).

    Returns flat pixel indices (K,), their distance to the curve (K,), the local half width there
    (K,), and the curve parameter in [0, 1] of the nearest sample (K,).
    """
    r = int(np.ceil(reach)) + 1
    dy, dx = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
    candidates = (np.rint(points).astype(np.int64)[:, None, :] + np.stack([dy.ravel(), dx.ravel()], 1)).reshape(-1, 2)
    inside = ((candidates >= 0) & (candidates < size)).all(axis=1)
    flat = np.unique(candidates[inside, 0] * size + candidates[inside, 1])
    pix = np.stack([flat // size, flat % size], axis=1).astype(np.float64)
    dist, nearest = cKDTree(points).query(pix, distance_upper_bound=reach + 1.0)
    keep = np.isfinite(dist)
    nearest = nearest[keep]
    t = nearest / max(len(points) - 1, 1)
    return flat[keep], dist[keep], half_width[nearest], t


def _groove(dist: np.ndarray, half_width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage of a pixel by a line of width 2·hw (1-D box filter) and a faint rim just outside it."""
    coverage = np.clip(np.minimum(dist + half_width, 0.5) - np.maximum(dist - half_width, -0.5), 0.0, 1.0)
    rim = np.clip(1.0 - np.abs(dist - (half_width + 0.9)) / 0.9, 0.0, 1.0)
    return coverage, rim


def _taper(t: np.ndarray, ends: float) -> np.ndarray:
    return np.sqrt(np.clip(np.minimum(t, 1.0 - t) / ends, 0.0, 1.0))


def _bezier(rng: np.random.Generator, size: int) -> np.ndarray:
    """A quadratic Bézier curve 40–400 px long (shorter on small images), sampled every ~0.25 px."""
    lo, hi = min(40.0, size / 4), min(400.0, size * 0.6)
    length = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # short scratches are the common ones
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    half = np.abs(direction) * length / 2 + 4.0
    mid = np.array([rng.uniform(min(half[0], size / 2), max(size - half[0], size / 2)), 0.0])
    mid[1] = rng.uniform(min(half[1], size / 2), max(size - half[1], size / 2))
    bend = rng.uniform(-0.12, 0.12) * length * np.array([-direction[1], direction[0]])
    p0, p2 = mid - direction * length / 2, mid + direction * length / 2
    p1 = mid + 2 * bend  # the curve passes through mid + bend
    n = int(np.ceil((np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)) / 0.25)) + 2
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _jagged(rng: np.random.Generator, size: int, start: np.ndarray, length: float) -> np.ndarray:
    """A crack-like random walk of 3–9 px steps from ``start``, sampled every ~0.25 px."""
    vertices = [start]
    heading = rng.uniform(0, 2 * np.pi)
    travelled = 0.0
    while travelled < length:
        heading += rng.normal(0.0, 0.45)
        step = rng.uniform(3.0, 9.0)
        vertices.append(vertices[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
        travelled += step
    path = []
    for a, b in itertools.pairwise(vertices):
        n = int(np.ceil(np.linalg.norm(b - a) / 0.25))
        path.append(a + (b - a) * np.linspace(0.0, 1.0, n, endpoint=False)[:, None])
    path.append(vertices[-1][None])
    return np.clip(np.concatenate(path), -8.0, size + 8.0)


def _draw_stroke(
    relief: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    width: float,
    depth: float,
    sign: float,
    rng: np.random.Generator,
    taper: bool = True,
) -> None:
    """Add a stroke (M, 2) of full width ``width`` px, tapering at both ends, to ``relief`` and ``mask``.

    A single point with ``taper=False`` is a disk of diameter ``width``.
    """
    size = relief.shape[0]
    hw_max = width / 2
    hw = np.full(len(points), hw_max)
    if taper:
        hw *= _taper(np.linspace(0.0, 1.0, len(points)), 0.1)
    flat, dist, half_width, t = _curve_band(points, hw, hw_max + 2.0, size)
    coverage, rim = _groove(dist, half_width)
    wobble = 1.0 + 0.2 * np.sin(2 * np.pi * (2.0 * t + rng.random()))  # depth varies a little along the stroke
    change = sign * depth * wobble * (coverage - 0.25 * rim)
    np.add.at(relief.reshape(-1), flat, change.astype(np.float32))
    mask.reshape(-1)[flat[coverage > MASK_COVERAGE]] = True


def _scratch(rng: np.random.Generator, relief: np.ndarray, mask: np.ndarray) -> None:
    points = _bezier(rng, relief.shape[0])
    sign = -1.0 if rng.random() < 0.75 else 1.0  # mostly dark grooves, some bright (specular) ones
    width = rng.uniform(0.6, 2.0)
    # A groove narrower than a pixel darkens it by depth × width: keep that at 3 % or more so every
    # scratch stays visible at 100 % zoom (the thinnest ones are then 5–12 % deep).
    _draw_stroke(relief, mask, points, width, rng.uniform(0.03 / min(width, 1.0), 0.12), sign, rng)


def _crack(rng: np.random.Generator, relief: np.ndarray, mask: np.ndarray) -> None:
    size = relief.shape[0]
    length = rng.uniform(min(30.0, size / 4), min(200.0, size / 2))
    start = rng.uniform(0.15 * size, 0.85 * size, size=2)
    points = _jagged(rng, size, start, length)
    width, depth = rng.uniform(0.8, 2.0), rng.uniform(0.12, 0.30)
    _draw_stroke(relief, mask, points, width, depth, -1.0, rng)
    if rng.random() < 0.5:  # a branch from somewhere along the crack
        fork = points[rng.integers(len(points) // 4, 3 * len(points) // 4 + 1)]
        branch = _jagged(rng, size, fork, length * rng.uniform(0.2, 0.5))
        _draw_stroke(relief, mask, branch, width * 0.7, depth * 0.8, -1.0, rng)


def _spot(rng: np.random.Generator, relief: np.ndarray, mask: np.ndarray) -> None:
    size = relief.shape[0]
    radius = rng.uniform(1.5, 6.0)
    centre = rng.uniform(8.0, size - 8.0, size=2)
    sign = -1.0 if rng.random() < 0.7 else 1.0
    _draw_stroke(relief, mask, centre[None, :], 2 * radius, rng.uniform(0.06, 0.20), sign, rng, taper=False)


def _stain(rng: np.random.Generator, relief: np.ndarray, mask: np.ndarray) -> None:
    size = relief.shape[0]
    radius = rng.uniform(min(12.0, size / 10), min(50.0, size / 5))
    cy, cx = rng.uniform(radius, size - radius, size=2)
    harmonics = np.arange(2, 6)
    amplitude = rng.uniform(0.0, 0.18, size=len(harmonics)) / (harmonics - 1)
    phase = rng.uniform(0, 2 * np.pi, size=len(harmonics))
    reach = int(np.ceil(radius * 1.6))
    y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, size)
    x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, size)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    rho = np.hypot(yy - cy, xx - cx)
    theta = np.arctan2(yy - cy, xx - cx)
    boundary = radius * (
        1.0 + (amplitude[:, None, None] * np.cos(harmonics[:, None, None] * theta + phase[:, None, None])).sum(0)
    )
    softness = 0.3 * radius
    coverage = np.clip((boundary - rho) / softness + 0.5, 0.0, 1.0)
    coverage = coverage * coverage * (3 - 2 * coverage)  # smoothstep: a soft edge
    relief[y0:y1, x0:x1] -= (rng.uniform(0.04, 0.10) * coverage).astype(np.float32)
    mask[y0:y1, x0:x1] |= coverage > MASK_COVERAGE


_DRAW = {DefectKind.SCRATCH: _scratch, DefectKind.SPOT: _spot, DefectKind.CRACK: _crack, DefectKind.STAIN: _stain}


def synth_image(seed: int, size: int = 1024, defects: Sequence[DefectKind] = ()) -> tuple[np.ndarray, np.ndarray]:
    """One brushed-metal image and its defect mask: ((size, size) uint8, (size, size) bool).

    Each kind in ``defects`` is drawn 1–3 times; the mask is True exactly where a defect's coverage
    exceeds 0.25 (all False when ``defects`` is empty). Same arguments, same bytes.
    """
    if size < 32:
        msg = f"size must be at least 32 px, got {size}"
        raise ValueError(msg)
    kinds = [DefectKind(kind) for kind in defects]
    surface = _surface(seed, size)
    relief = np.zeros((size, size), dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    rng = _rng(seed, _DEFECTS)
    for kind in kinds:
        for _ in range(int(rng.integers(1, 4))):
            _DRAW[kind](rng, relief, mask)
    image = surface * (1.0 + relief)
    sensor = _rng(seed, _SENSOR)
    noise_std = np.float32(sensor.uniform(0.003, 0.006))
    image += noise_std * np.sqrt(np.maximum(image, 0.0) / 0.5) * sensor.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8), mask


def _derived_seed(seed: int, role: int, index: int) -> int:
    """A seed for one image of a dataset: independent across roles and indices."""
    return int(np.random.SeedSequence([seed, role, index]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class DatasetSpec:
    """Every argument of `make_dataset`; with `GENERATOR_VERSION` it fixes the dataset's bytes."""

    size: int
    n_train: int
    contamination: float
    n_abnormal: int
    n_calibration: int
    n_test_normal: int
    n_test_defect: int
    seed: int
    kinds: tuple[DefectKind, ...]
    contamination_density: int = 1


@dataclass(frozen=True, eq=False)
class SyntheticDataset:
    """A synthetic brushed-metal dataset. Images are (S, S) uint8, masks (S, S) bool.

    ``train_normal`` is the noisy normal set: the images flagged in ``train_contaminated`` carry
    unlabelled defects (their true masks are in ``train_masks``, for analysis only, never for
    training). ``abnormal`` are the few confirmed abnormal images, with ``abnormal_masks``.
    ``calibration`` are clean normal images held out for thresholds. ``test_labels`` is ``"good"``
    or the defect kind of each test image; ``test_masks`` are all False for good ones.
    """

    spec: DatasetSpec
    train_normal: list[np.ndarray]
    train_contaminated: list[bool]
    train_masks: list[np.ndarray]
    abnormal: list[np.ndarray]
    abnormal_masks: list[np.ndarray]
    abnormal_kinds: list[DefectKind]
    calibration: list[np.ndarray]
    test_images: list[np.ndarray]
    test_masks: list[np.ndarray]
    test_labels: list[str]

    def digest(self) -> str:
        """A short sha256 hex digest of the generator version and every parameter (16 hex digits)."""
        payload = {"generator": "anomap.synthetic", "version": GENERATOR_VERSION, **asdict(self.spec)}
        payload["kinds"] = [str(kind) for kind in self.spec.kinds]
        if payload["contamination_density"] == 1:  # the default: digests from before the field stay valid
            del payload["contamination_density"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_TRAIN, _ABNORMAL, _CALIBRATION, _TEST_GOOD, _TEST_DEFECT, _CONTAMINATION = range(10, 16)


def make_dataset(
    size: int = 1024,
    n_train: int = 24,
    contamination: float = 0.1,
    n_abnormal: int = 4,
    n_calibration: int = 4,
    n_test_normal: int = 8,
    n_test_defect: int = 8,
    seed: int = 0,
    kinds: Sequence[DefectKind] = (DefectKind.SCRATCH,),
    contamination_density: int = 1,
) -> SyntheticDataset:
    """Generate a whole dataset, deterministically; each image has its own derived seed.

    Exactly ``round(contamination * n_train)`` training images (chosen by the seed) carry unlabelled
    defects of ``kinds``, so that ``p_an`` (the abnormal images, also of ``kinds``) matches the
    contamination. Abnormal and defective test images cycle through ``kinds``, one kind per image,
    drawn 1–3 times. Takes about 0.15 s per 1024² image.

    ``contamination_density`` draws each kind that many times (1–3 defects each) on a contaminated
    training image. The GAN's samples are patches, and at the default a contaminated 256² image has
    defects in 22–28 % of its 32² patch positions (1024²: ~3 %), so ε = 0.1 of the images is ~3 % of
    the samples (1024²: 0.3 %); 8 draws raise that to 72–79 % per image at 256², where ε of the images
    is then close to the share of contaminated *samples*, as in the paper (see `patch_contamination`).
    """
    kinds = tuple(DefectKind(kind) for kind in kinds)
    if not 0.0 <= contamination <= 1.0:
        msg = f"contamination must be in [0, 1], got {contamination}"
        raise ValueError(msg)
    counts = {"n_train": n_train, "n_abnormal": n_abnormal, "n_calibration": n_calibration}
    counts |= {"n_test_normal": n_test_normal, "n_test_defect": n_test_defect}
    if any(value < 0 for value in counts.values()):
        msg = f"image counts must be >= 0, got {counts}"
        raise ValueError(msg)
    if contamination_density < 1:
        msg = f"contamination_density must be >= 1, got {contamination_density}"
        raise ValueError(msg)
    n_contaminated = round(contamination * n_train)
    if not kinds and (n_contaminated or n_abnormal or n_test_defect):
        msg = "kinds is empty, but contaminated, abnormal or defective test images were asked for"
        raise ValueError(msg)
    spec = DatasetSpec(
        size,
        n_train,
        contamination,
        n_abnormal,
        n_calibration,
        n_test_normal,
        n_test_defect,
        seed,
        kinds,
        contamination_density,
    )
    chosen = set(_rng(seed, _CONTAMINATION).permutation(n_train)[:n_contaminated].tolist())
    contaminated = [i in chosen for i in range(n_train)]
    dirty = kinds * contamination_density
    train = [
        synth_image(_derived_seed(seed, _TRAIN, i), size, dirty if contaminated[i] else ()) for i in range(n_train)
    ]
    abnormal_kinds = [kinds[i % len(kinds)] for i in range(n_abnormal)]
    abnormal = [synth_image(_derived_seed(seed, _ABNORMAL, i), size, [k]) for i, k in enumerate(abnormal_kinds)]
    calibration = [synth_image(_derived_seed(seed, _CALIBRATION, i), size)[0] for i in range(n_calibration)]
    test_good = [synth_image(_derived_seed(seed, _TEST_GOOD, i), size) for i in range(n_test_normal)]
    test_kinds = [kinds[i % len(kinds)] for i in range(n_test_defect)]
    test_bad = [synth_image(_derived_seed(seed, _TEST_DEFECT, i), size, [k]) for i, k in enumerate(test_kinds)]
    tests = test_good + test_bad
    return SyntheticDataset(
        spec=spec,
        train_normal=[image for image, _ in train],
        train_contaminated=contaminated,
        train_masks=[mask for _, mask in train],
        abnormal=[image for image, _ in abnormal],
        abnormal_masks=[mask for _, mask in abnormal],
        abnormal_kinds=abnormal_kinds,
        calibration=calibration,
        test_images=[image for image, _ in tests],
        test_masks=[mask for _, mask in tests],
        test_labels=["good"] * n_test_normal + [str(k) for k in test_kinds],
    )


def write_dataset_folder(dataset: SyntheticDataset, root: Path) -> None:
    """Write ``dataset`` as PNGs in the MVTec-like layout of method.md §7 (masks 0/255)::

        root/train/good/000.png ...                        noisy normal training images
        root/train/abnormal/000.png ...                    confirmed abnormal images
        root/ground_truth/train_abnormal/000_mask.png ...
        root/test/good/000.png ...
        root/test/<kind>/000.png ...                       numbered per kind
        root/ground_truth/<kind>/000_mask.png ...
        root/calibration/good/000.png ...                  held-out clean normal images (extra folder)
        root/synthetic.json                                digest, parameters, contaminated stems

    Existing files of the same names are overwritten.
    """
    root = Path(root)

    def put(relative: str, array: np.ndarray) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(array))

    for i, image in enumerate(dataset.train_normal):
        put(f"train/good/{i:03d}.png", image)
    for i, (image, mask) in enumerate(zip(dataset.abnormal, dataset.abnormal_masks, strict=True)):
        put(f"train/abnormal/{i:03d}.png", image)
        put(f"ground_truth/train_abnormal/{i:03d}_mask.png", mask)
    for i, image in enumerate(dataset.calibration):
        put(f"calibration/good/{i:03d}.png", image)
    per_label: dict[str, int] = {}
    for image, mask, label in zip(dataset.test_images, dataset.test_masks, dataset.test_labels, strict=True):
        index = per_label.get(label, 0)
        per_label[label] = index + 1
        put(f"test/{label}/{index:03d}.png", image)
        if label != "good":
            put(f"ground_truth/{label}/{index:03d}_mask.png", mask)
    info = {
        "digest": dataset.digest(),
        "generator_version": GENERATOR_VERSION,
        "spec": {**asdict(dataset.spec), "kinds": [str(k) for k in dataset.spec.kinds]},
        "contaminated_train_images": [f"{i:03d}.png" for i, c in enumerate(dataset.train_contaminated) if c],
    }
    (root / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
