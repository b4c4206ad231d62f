"""`InspectionJob`: one camera image to score, as it travels on ``anomap:jobs[:<line>]``.

The JSON envelope travels in the entry's ``job`` field; the image travels either inline as raw file
bytes (PNG/JPEG/TIFF/BMP) in the entry's ``image`` field, or as ``image_ref = "s3://bucket/key"``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.ids import CameraId, JobId, LineId, S3RefStr

MIN_PIXEL_THRESHOLD = 1e-6
"""The smallest pixel-threshold override: maps are residuals of order 0.01–1, so a smaller one would only
make every pixel anomalous, and one near 0 makes the regions' normalised peaks overflow to infinity."""


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class InspectionJob(BaseModel):
    """One image to inspect.

    >>> InspectionJob(job_id="cam01-000001", camera_id="cam01").line
    'default'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    job_id: JobId
    camera_id: CameraId = "cam00"
    line: LineId = "default"
    captured_at: AwareDatetime = Field(default_factory=utc_now)
    published_at: AwareDatetime = Field(default_factory=utc_now)
    image_ref: S3RefStr | None = None
    pixel_threshold: float | None = Field(default=None, ge=MIN_PIXEL_THRESHOLD, le=1e6)
    """Override of the model card's pixel threshold for this job (raw map units)."""
