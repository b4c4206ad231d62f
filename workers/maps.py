"""Where anomaly maps live in the object store, and their file formats.

    maps/<line>/<yyyy>/<mm>/<dd>/<job_id>.npz   float16 (H, W) map in raw units, array name "map"
    maps/<line>/<yyyy>/<mm>/<dd>/<job_id>.jpg   RGB overlay for people (JPEG, see `workers.overlay`)
    maps/<line>/<yyyy>/<mm>/<dd>/http/<job_id>.{npz,jpg}   the same for ``POST /v1/inspect`` (job ids hold
                                                           no ``/``, so these never meet a streamed job's)

Maps are stored as float16: 2.1 MB for 1024² where float32 took 4.2 MB, the largest object a job
writes. A stored value of magnitude at least 2⁻¹⁴ ≈ 6.1e-5 (float16's smallest normal number) is the
computed one to within 2⁻¹¹ (0.05 %) relative; a smaller one is within 2⁻²⁵ ≈ 3e-8 absolute (float16's
subnormal spacing halved), so values under 3e-8 are stored as 0. The result's scores and regions are
computed from the float32 map before it is stored. A map with a value float16
cannot hold (beyond ±65504, or not finite) is stored as float32. `decode_map` returns float32
either way, and reads the float32 maps written before.

Keys derive from the job's validated ``line``, ``captured_at`` date and ``job_id`` only, so a
redelivered job overwrites its own map rather than writing a second one.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np

from schemas import InspectionJob
from workers.inspection import ScoredImage
from workers.overlay import OVERLAY_CONTENT_TYPE, OVERLAY_SUFFIX, overlay_jpeg


class MapObject(NamedTuple):
    """One object to write for a scored job."""

    key: str
    data: bytes
    content_type: str


HTTP_FOLDER = "http"
"""The folder of the maps that ``POST /v1/inspect`` writes, below each day's."""


def map_keys(job: InspectionJob, folder: str | None = None) -> tuple[str, str]:
    """The (npz, jpg) object keys of a job's anomaly map and overlay (in ``folder`` of the day, if given)."""
    day = job.captured_at.strftime("%Y/%m/%d")
    stem = f"maps/{job.line}/{day}/{folder + '/' if folder else ''}{job.job_id}"
    return f"{stem}.npz", f"{stem}{OVERLAY_SUFFIX}"


def stored_map_dtype(anomaly_map: np.ndarray) -> type[np.floating]:
    """float16 when every value of ``anomaly_map`` fits it (finite, within ±65504), else float32."""
    finite = bool(np.isfinite(anomaly_map).all())
    fits = finite and float(np.abs(anomaly_map).max(initial=0.0)) <= float(np.finfo(np.float16).max)
    return np.float16 if fits else np.float32


def encode_map(anomaly_map: np.ndarray) -> bytes:
    """Serialise an (H, W) map as an ``.npz`` holding array ``map``, float16 where it fits (no pickle)."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, map=amap.astype(stored_map_dtype(amap)))
    return buffer.getvalue()


def decode_map(data: bytes) -> np.ndarray:
    """Read an ``.npz`` written by `encode_map` (float16 or float32) back into a float32 (H, W) array."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return np.asarray(archive["map"], dtype=np.float32)


def map_objects(
    job: InspectionJob, image: np.ndarray, scored: ScoredImage, folder: str | None = None
) -> tuple[MapObject, MapObject]:
    """The (npz map, JPEG overlay) objects of a scored job, keyed by `map_keys`."""
    npz_key, overlay_key = map_keys(job, folder)
    overlay = overlay_jpeg(image, scored.anomaly_map, scored.pixel_threshold)
    return (
        MapObject(npz_key, encode_map(scored.anomaly_map), "application/octet-stream"),
        MapObject(overlay_key, overlay, OVERLAY_CONTENT_TYPE),
    )
