"""The evaluation report of `anomap eval`: one self-contained HTML page, charts drawn as inline SVG.

    write_eval_report(Path("eval-report"), result, dataset, card)
    # eval-report/index.html                 metrics, ROC + PR curves (image and pixel), score histogram
    # eval-report/case-00_{image,overlay,mask}.png   the gallery: best and worst cases of each class

The gallery shows, for defect images, the highest scored (best) and lowest scored (worst, missed)
and, for good images, the lowest (best) and highest scored (worst, false alarms). Scores are
normalised: 1.0 is the model's image threshold. No plotting library: the SVG is written here.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas import ModelCard
from trainer.evaluation import Curve, EvaluationResult, TestSet
from trainer.imaging import encode_png
from trainer.patches import as_unit_float
from workers.overlay import render_overlay

GALLERY_PER_GROUP = 3
_W, _H, _PAD = 360, 300, 46  # SVG chart size and margin (pixels)
_COLOURS = {"image": "#1f77b4", "pixel": "#d62728", "good": "#2ca02c", "defect": "#d62728"}


@dataclass(frozen=True)
class GalleryCase:
    """One test image shown in the gallery: its index in the result and why it was chosen."""

    index: int
    group: str  # e.g. "worst defect (missed)"


def gallery_cases(result: EvaluationResult, per_group: int = GALLERY_PER_GROUP) -> list[GalleryCase]:
    """Best and worst ``per_group`` cases of each class, by image score; each image at most once."""
    scores = result.image_scores
    defect = np.flatnonzero(result.anomalous)
    good = np.flatnonzero(~result.anomalous)
    groups = [
        ("worst defect (lowest score)", defect[np.argsort(scores[defect], kind="stable")]),
        ("worst good (highest score)", good[np.argsort(-scores[good], kind="stable")]),
        ("best defect (highest score)", defect[np.argsort(-scores[defect], kind="stable")]),
        ("best good (lowest score)", good[np.argsort(scores[good], kind="stable")]),
    ]
    chosen: list[GalleryCase] = []
    seen: set[int] = set()
    for group, ranked in groups:
        for index in [int(i) for i in ranked if int(i) not in seen][:per_group]:
            chosen.append(GalleryCase(index, group))
            seen.add(index)
    return chosen


def _xy(x: float, y: float) -> str:
    """Data coordinates in [0, 1]² -> SVG pixel coordinates."""
    return f"{_PAD + x * (_W - 1.5 * _PAD):.1f},{_H - _PAD - y * (_H - 1.5 * _PAD):.1f}"


def _axes(title: str, x_label: str, y_label: str, x_scale: float = 1.0, y_scale: float = 1.0) -> list[str]:
    """Frame, title, axis labels and ticks at 0, ½, 1 of the frame (labelled in data units × scale)."""
    parts = [
        f'<text x="{_W / 2}" y="16" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{_PAD}" y="{_PAD / 2}" width="{_W - 1.5 * _PAD}" height="{_H - 1.5 * _PAD}" '
        'fill="none" stroke="#888"/>',
        f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="12" y="{_H / 2}" text-anchor="middle" transform="rotate(-90 12 {_H / 2})">'
        f"{html.escape(y_label)}</text>",
    ]
    for tick in (0.0, 0.5, 1.0):
        x, y = _xy(tick, 0).split(",")
        parts.append(
            f'<text x="{x}" y="{float(y) + 14}" text-anchor="middle" font-size="10">{tick * x_scale:.3g}</text>'
        )
        x, y = _xy(0, tick).split(",")
        parts.append(
            f'<text x="{float(x) - 4}" y="{float(y) + 4}" text-anchor="end" font-size="10">{tick * y_scale:.3g}</text>'
        )
    return parts


def curve_svg(
    title: str, x_label: str, y_label: str, series: Sequence[tuple[str, Curve | None, str]], diagonal: bool = False
) -> str:
    """A line chart on [0, 1]² of ``(name, curve, colour)`` series (None = not defined, listed as such)."""
    parts = _axes(title, x_label, y_label)
    if diagonal:
        parts.append(f'<polyline points="{_xy(0, 0)} {_xy(1, 1)}" stroke="#bbb" stroke-dasharray="4 3" fill="none"/>')
    for row, (name, curve, colour) in enumerate(series):
        label_y = _PAD / 2 + 16 + 14 * row
        if curve is None:
            parts.append(f'<text x="{_PAD + 8}" y="{label_y}" fill="#999">{html.escape(name)}: not defined</text>')
            continue
        points = " ".join(_xy(float(x), float(y)) for x, y in zip(curve.x, curve.y, strict=True))
        parts.append(f'<polyline class="curve" points="{points}" stroke="{colour}" stroke-width="2" fill="none"/>')
        parts.append(f'<text x="{_PAD + 8}" y="{label_y}" fill="{colour}">{html.escape(name)}</text>')
    body = "\n".join(parts)
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-size="12">\n{body}\n</svg>'


def histogram_svg(normalised_scores: np.ndarray, anomalous: np.ndarray, bins: int = 24) -> str:
    """Stacked histogram of normalised image scores (N,) by class, with the threshold (1.0) marked."""
    scores = np.asarray(normalised_scores, dtype=np.float64)
    top = max(float(scores.max()) * 1.05, 1.25)
    edges = np.linspace(0.0, top, bins + 1)
    good, _ = np.histogram(np.clip(scores[~anomalous], 0, top), edges)
    defect, _ = np.histogram(np.clip(scores[anomalous], 0, top), edges)
    peak = max(int((good + defect).max()), 1)
    parts = _axes("Image scores (1.0 = threshold)", "normalised image score", "images", top, peak)
    width = (_W - 1.5 * _PAD) / bins
    for i in range(bins):
        base = 0
        for count, colour in ((good[i], _COLOURS["good"]), (defect[i], _COLOURS["defect"])):
            if count:
                x, y_top = _xy(i / bins, (base + count) / peak).split(",")
                height = (_H - 1.5 * _PAD) * count / peak
                parts.append(
                    f'<rect class="bar" x="{x}" y="{y_top}" width="{width - 1:.1f}" height="{height:.1f}" '
                    f'fill="{colour}" fill-opacity="0.75"/>'
                )
                base += count
    marker = 1.0 / top
    parts.append(
        f'<polyline class="threshold" points="{_xy(marker, 0)} {_xy(marker, 1)}" stroke="black" '
        'stroke-width="2" stroke-dasharray="5 3"/>'
    )
    parts.append(f'<text x="{_xy(marker, 1).split(",")[0]}" y="{_PAD / 2 + 12}" font-size="11"> threshold</text>')
    parts.append(f'<text x="{_PAD + 8}" y="{_PAD / 2 + 28}" fill="{_COLOURS["good"]}">good</text>')
    parts.append(f'<text x="{_PAD + 8}" y="{_PAD / 2 + 42}" fill="{_COLOURS["defect"]}">defect</text>')
    body = "\n".join(parts)
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-size="12">\n{body}\n</svg>'


def _metric_rows(result: EvaluationResult) -> str:
    labels = {
        "image_auroc": "image AUROC",
        "pixel_auroc": "pixel AUROC",
        "pixel_ap": "pixel average precision",
        "aupro": "AUPRO (FPR ≤ 30 %)",
    }
    rows = []
    for key, label in labels.items():
        value = f"{result.metrics[key]:.4f}" if key in result.metrics else "—"
        why = html.escape(result.undefined.get(key, ""))
        rows.append(f"<tr><td>{label}</td><td><b>{value}</b></td><td>{why}</td></tr>")
    return "\n".join(rows)


def _gallery(out_dir: Path, result: EvaluationResult, dataset: TestSet, cases: list[GalleryCase]) -> str:
    rows = []
    for n, case in enumerate(cases):
        i = case.index
        stem = f"case-{n:02d}"
        image = as_unit_float(np.asarray(dataset.test_images[i]))
        (out_dir / f"{stem}_image.png").write_bytes(encode_png(image))
        overlay = render_overlay(image, result.maps[i], result.pixel_threshold)
        (out_dir / f"{stem}_overlay.png").write_bytes(encode_png(overlay))
        mask = dataset.test_masks[i]
        if mask is None:
            truth = "<td>mask unknown</td>"
        else:
            (out_dir / f"{stem}_mask.png").write_bytes(encode_png(np.asarray(mask, dtype=bool)))
            truth = f'<td><img src="{stem}_mask.png" alt="ground truth"></td>'
        score = result.image_scores[i] / result.image_threshold
        verdict = "ANOMALOUS" if score >= 1.0 else "ok"
        rows.append(
            f"<tr><td><b>{html.escape(case.group)}</b><br>{html.escape(result.names[i])}<br>"
            f"truth: {html.escape(result.labels[i])}<br>score {score:.2f} ({verdict})</td>"
            f'<td><img src="{stem}_image.png" alt="image"></td><td><img src="{stem}_overlay.png" alt="overlay"></td>'
            f"{truth}</tr>"
        )
    return "\n".join(rows)


def write_eval_report(
    out_dir: Path, result: EvaluationResult, dataset: TestSet, card: ModelCard, title: str = "anomap evaluation"
) -> Path:
    """Write ``index.html`` (curves, histogram, metrics) and gallery PNGs into ``out_dir``; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    roc = curve_svg(
        "ROC",
        "false positive rate",
        "true positive rate",
        [("image", result.image_roc, _COLOURS["image"]), ("pixel", result.pixel_roc, _COLOURS["pixel"])],
        diagonal=True,
    )
    pr = curve_svg(
        "Precision-recall",
        "recall",
        "precision",
        [("image", result.image_pr, _COLOURS["image"]), ("pixel", result.pixel_pr, _COLOURS["pixel"])],
    )
    histogram = histogram_svg(result.image_scores / result.image_threshold, result.anomalous)
    gallery = _gallery(out_dir, result, dataset, gallery_cases(result))
    model = {
        "name": card.name,
        "version": card.version,
        "gamma": card.gamma,
        "patch_size": card.patch_size,
        "stride": card.stride,
        "data_digest": card.data_digest,
    }
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{width:300px;image-rendering:pixelated}}
td{{vertical-align:top;padding:4px}} pre{{background:#f4f4f4;padding:1em}} svg{{margin-right:1em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Model {html.escape(card.name)}/{html.escape(card.version)}. Image scores are normalised: 1.0 is the
model's image threshold. Overlay: red-to-yellow where the anomaly map is above the pixel threshold.
Pixel metrics use the images whose mask is known.</p>
<table><tr><th>metric</th><th>value</th><th>note</th></tr>
{_metric_rows(result)}
</table>
<div class="charts">
{roc}
{pr}
{histogram}
</div>
<h2>Gallery</h2>
<table><tr><th>case</th><th>image</th><th>overlay</th><th>ground truth</th></tr>
{gallery}
</table>
<h2>Details</h2>
<pre>{html.escape(json.dumps({"model": model, **result.to_json()}, indent=2))}</pre>
</body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path
