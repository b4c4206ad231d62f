"""The demo's visual report: for a few jobs, the image, its overlay and the true mask side by side.

write_report(out_dir, cases, summary)   # out_dir/index.html + <job_id>_{image,mask}.png + <job_id>_overlay.jpg
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.imaging import encode_png


@dataclass(frozen=True)
class ReportCase:
    """One job to show: its image (H, W) in [0, 1], stored overlay (JPEG bytes), true mask and result figures."""

    job_id: str
    camera_id: str
    image: np.ndarray
    overlay_jpeg: bytes
    mask: np.ndarray
    image_score: float
    is_anomalous: bool
    n_regions: int


def write_report(out_dir: Path, cases: list[ReportCase], summary: dict[str, object]) -> Path:
    """Write ``index.html`` and its pictures into ``out_dir``; returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        stem = case.job_id
        (out_dir / f"{stem}_image.png").write_bytes(encode_png(case.image))
        (out_dir / f"{stem}_overlay.jpg").write_bytes(case.overlay_jpeg)
        (out_dir / f"{stem}_mask.png").write_bytes(encode_png(case.mask.astype(np.uint8) * 255))
        truth = "defect" if case.mask.any() else "normal"
        verdict = "ANOMALOUS" if case.is_anomalous else "ok"
        rows.append(
            f"<tr><td><b>{html.escape(stem)}</b><br>{html.escape(case.camera_id)}<br>truth: {truth}<br>"
            f"verdict: {verdict}<br>score {case.image_score:.2f}<br>{case.n_regions} region(s)</td>"
            f'<td><img src="{stem}_image.png"></td><td><img src="{stem}_overlay.jpg"></td>'
            f'<td><img src="{stem}_mask.png"></td></tr>'
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>anomap demo report</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{width:340px;image-rendering:pixelated}}
td{{vertical-align:top;padding:4px}} pre{{background:#f4f4f4;padding:1em}}</style></head>
<body><h1>anomap demo</h1>
<p>Scores are normalised: 1.0 is the model's image threshold. Overlay: red-to-yellow where the
anomaly map is above the pixel threshold, outlined in red.</p>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>
<table><tr><th>job</th><th>image</th><th>overlay</th><th>true mask</th></tr>
{"".join(rows)}
</table></body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path
