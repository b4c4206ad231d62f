"""Evaluate a model version on a labelled test set (method.md §6): maps, image scores, metrics, curves.

Example (MVTec-like folder, 20 test images of 256×256, a P = 64 model on the CPU)::

    data = load_dataset(Path("metal"), DatasetPart.TEST)
    result = evaluate(PatchModel.from_safetensors(card, weights), data, progress=print)
    # "evaluated 10/20 images (50 %), 1.9 images/s, ETA 5 s"
    result.metrics       # {"image_auroc": 0.93, "pixel_auroc": 0.97, "pixel_ap": 0.31, "aupro": 0.71}
    result.undefined     # {} or e.g. {"pixel_ap": "no defect image has a mask"}
    result.image_roc     # Curve(x=FPR (K,), y=TPR (K,)); image_pr: x=recall, y=precision
    result.to_json()     # metrics, counts and confusion at the card's image threshold

Maps are the raw (H, W) float32 maps of `trainer.scoring.anomaly_map`; an image score is the map's
maximum (`trainer.postprocess.image_score`). Image metrics use every test image; pixel metrics use
the images whose mask is known (``test/good`` and defect images with a mask). A metric that needs
both classes and lacks one is left out of ``metrics`` and explained in ``undefined``. All maps stay
in memory (4 MB per 1024² image), as the pooled pixel metrics need them together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from trainer.metrics import (
    aupro,
    image_auroc,
    pixel_auroc,
    pixel_average_precision,
    pool_pixels,
    precision_recall_steps,
)
from trainer.postprocess import image_score
from trainer.scoring import PatchModel, anomaly_map

Progress = Callable[[str], None]
GOOD = "good"
CURVE_POINTS = 400
"""Points kept per curve for the report (evenly spaced along the drawn curve)."""
CURVE_PIXELS = 1 << 22
"""Pooled pixels used for the pixel curves (a fixed pseudo-random per-class subset above this)."""
AUPRO_MAX_FPR = 0.3


class TestSet(Protocol):
    """What `evaluate` reads: `FolderDataset` and `trainer.synthetic.SyntheticDataset` both fit."""

    test_images: Sequence[np.ndarray]  # (H, W) uint8 or float in [0, 1]
    test_masks: Sequence[np.ndarray | None]  # (H, W) bool, None = unknown
    test_labels: Sequence[str]  # "good" or the defect kind


@dataclass(frozen=True)
class Curve:
    """A ROC (x = FPR, y = TPR) or PR (x = recall, y = precision) curve: (K,) float64 each."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """Everything `evaluate` measured; ``maps[i]`` is the raw (H, W) map of test image i."""

    maps: list[np.ndarray]
    image_scores: np.ndarray  # (N,) raw, max of each map
    labels: list[str]  # (N,)
    names: list[str]  # (N,) for reports
    anomalous: np.ndarray  # (N,) bool: label != "good"
    mask_known: np.ndarray  # (N,) bool
    metrics: dict[str, float]
    undefined: dict[str, str]
    image_roc: Curve | None
    image_pr: Curve | None
    pixel_roc: Curve | None
    pixel_pr: Curve | None
    image_threshold: float
    pixel_threshold: float
    seconds: float

    def confusion(self) -> dict[str, int]:
        """Counts at the card's image threshold (normalised score >= 1.0 is anomalous)."""
        flagged = self.image_scores >= self.image_threshold
        return {
            "true_positive": int(np.sum(flagged & self.anomalous)),
            "false_positive": int(np.sum(flagged & ~self.anomalous)),
            "true_negative": int(np.sum(~flagged & ~self.anomalous)),
            "false_negative": int(np.sum(~flagged & self.anomalous)),
        }

    def to_json(self) -> dict[str, object]:
        """Metrics (None where undefined), counts and the confusion at the image threshold."""
        names = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
        return {
            "metrics": {name: self.metrics.get(name) for name in names},
            "undefined": dict(self.undefined),
            "aupro_max_fpr": AUPRO_MAX_FPR,
            "counts": {
                "test_images": len(self.labels),
                "good": int(np.sum(~self.anomalous)),
                "defect": int(np.sum(self.anomalous)),
                "defect_with_mask": int(np.sum(self.anomalous & self.mask_known)),
                "pixel_metric_images": int(np.sum(self.mask_known)),
                "per_label": {label: self.labels.count(label) for label in sorted(set(self.labels))},
            },
            "thresholds": {"image": self.image_threshold, "pixel": self.pixel_threshold},
            "at_image_threshold": self.confusion(),
            "seconds": round(self.seconds, 2),
        }


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (TP, FP) at each distinct score from the highest down: (T,) float64 each."""
    order = np.argsort(scores, kind="stable")[::-1]
    ranked = scores[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    tps = np.cumsum(labels[order], dtype=np.float64)[last]
    return tps, 1.0 + last - tps


def _thin(x: np.ndarray, y: np.ndarray, points: int) -> Curve:
    """At most ``points`` + 1 of the (K,) points (x, y), evenly spaced along the drawn curve.

    Spacing is by path length (|Δx| + |Δy|, both axes in [0, 1]), not by rank: with rare defect
    pixels the whole precision/recall trade-off sits in the first few thousand of millions of ranks.
    """
    if x.size > points:
        path = np.r_[0.0, np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))]
        bucket = np.floor(path / max(path[-1], 1e-12) * (points - 1))
        keep = np.r_[0, np.flatnonzero(np.diff(bucket)) + 1, x.size - 1]
        keep = np.unique(keep)
        x, y = x[keep], y[keep]
    return Curve(x=x, y=y)


def roc_curve(scores: np.ndarray, labels: np.ndarray, points: int = CURVE_POINTS) -> Curve:
    """ROC of scores (N,) against bool labels (N,), from (0, 0) to (1, 1), at most ``points`` + 2 points."""
    tps, fps = _ranked_counts(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool))
    curve = _thin(fps / fps[-1], tps / tps[-1], points)
    return Curve(x=np.r_[0.0, curve.x], y=np.r_[0.0, curve.y])


def pr_curve(
    scores: np.ndarray,
    labels: np.ndarray,
    points: int = CURVE_POINTS,
    normal_rate: float = 1.0,
    defect_rate: float = 1.0,
) -> Curve:
    """Precision against recall of scores (N,) and bool labels (N,), recall ascending from 0.

    ``normal_rate`` / ``defect_rate``: the fractions of each class kept when the pool was subsampled
    per class (`trainer.metrics.pool_pixels`), weighed as in `trainer.metrics.precision_recall_steps`.
    """
    precision, recall = precision_recall_steps(
        np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool), normal_rate, defect_rate
    )
    curve = _thin(recall, precision, points)
    return Curve(x=np.r_[0.0, curve.x], y=np.r_[curve.y[0], curve.y])


def _both_classes(labels: np.ndarray) -> bool:
    return 0 < int(np.count_nonzero(labels)) < labels.size


def _pixel_metrics(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], metrics: dict[str, float], undefined: dict[str, str]
) -> tuple[Curve | None, Curve | None]:
    names = ("pixel_auroc", "pixel_ap", "aupro")
    if not maps:
        undefined.update(dict.fromkeys(names, "no test image has a known mask"))
        return None, None
    n_defect = sum(int(np.count_nonzero(g)) for g in masks)
    if n_defect == 0:
        undefined.update(dict.fromkeys(names, "no defect pixel in any known mask"))
        return None, None
    if n_defect == sum(g.size for g in masks):
        undefined.update(dict.fromkeys(names, "every known mask is all defect: no normal pixel"))
        return None, None
    metrics["pixel_auroc"] = pixel_auroc(maps, masks)
    metrics["pixel_ap"] = pixel_average_precision(maps, masks)
    metrics["aupro"] = float(aupro(maps, masks, max_fpr=AUPRO_MAX_FPR))
    sample = pool_pixels(maps, masks, CURVE_PIXELS)  # per class: a rare class is never drawn away
    if not _both_classes(sample.labels):
        return None, None
    return roc_curve(sample.scores, sample.labels), pr_curve(
        sample.scores, sample.labels, normal_rate=sample.normal_rate, defect_rate=sample.defect_rate
    )


def _eta_line(done: int, total: int, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = ""
    if rate > 0 and done < total:
        minutes, seconds = divmod(round((total - done) / rate), 60)
        eta = f", ETA {minutes} min {seconds:02d} s" if minutes else f", ETA {seconds} s"
    return f"evaluated {done}/{total} images ({100 * done / max(total, 1):.0f} %), {rate:.2f} images/s{eta}"


def evaluate(
    model: PatchModel,
    dataset: TestSet,
    progress: Progress | None = None,
    report_every_s: float = 2.0,
    batch_size: int = 256,
) -> EvaluationResult:
    """Score every test image of ``dataset`` with ``model`` and measure the four metrics of method.md §6.

    ``progress`` gets a line with the count, rate and ETA at most every ``report_every_s`` seconds,
    and always after the last image. Raises ValueError on an empty test set or a mask whose shape
    differs from its image's.
    """
    images, masks, labels = list(dataset.test_images), list(dataset.test_masks), list(dataset.test_labels)
    if not images:
        msg = "the test set is empty; expected test/good and test/<defect> images"
        raise ValueError(msg)
    if not len(images) == len(masks) == len(labels):
        msg = f"{len(images)} test images, {len(masks)} masks and {len(labels)} labels; expected one of each per image"
        raise ValueError(msg)
    names = list(getattr(dataset, "test_names", None) or [f"{label}/{i:03d}" for i, label in enumerate(labels)])
    say = progress or (lambda message: None)
    started = last_report = time.monotonic()
    maps: list[np.ndarray] = []
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        if mask is not None and mask.shape != image.shape:
            msg = f"test image {names[i]} is {image.shape} but its mask is {mask.shape}"
            raise ValueError(msg)
        maps.append(anomaly_map(image, model, batch_size=batch_size))
        now = time.monotonic()
        if now - last_report >= report_every_s or i == len(images) - 1:
            say(_eta_line(i + 1, len(images), now - started))
            last_report = now

    scores = np.array([image_score(m) for m in maps], dtype=np.float64)
    anomalous = np.array([label != GOOD for label in labels], dtype=bool)
    known = np.array([mask is not None for mask in masks], dtype=bool)
    metrics: dict[str, float] = {}
    undefined: dict[str, str] = {}
    image_roc = image_pr = None
    if _both_classes(anomalous):
        metrics["image_auroc"] = image_auroc(scores, anomalous)
        image_roc, image_pr = roc_curve(scores, anomalous), pr_curve(scores, anomalous)
    else:
        only = "defect" if anomalous.all() else "good"
        undefined["image_auroc"] = f"the test set has only {only} images"
    known_maps = [m for m, k in zip(maps, known, strict=True) if k]
    known_masks = [np.asarray(g, dtype=bool) for g in masks if g is not None]
    pixel_roc, pixel_pr = _pixel_metrics(known_maps, known_masks, metrics, undefined)
    thresholds = model.card.thresholds
    return EvaluationResult(
        maps=maps,
        image_scores=scores,
        labels=labels,
        names=names,
        anomalous=anomalous,
        mask_known=known,
        metrics=metrics,
        undefined=undefined,
        image_roc=image_roc,
        image_pr=image_pr,
        pixel_roc=pixel_roc,
        pixel_pr=pixel_pr,
        image_threshold=float(thresholds.image),
        pixel_threshold=float(thresholds.pixel),
        seconds=time.monotonic() - started,
    )
