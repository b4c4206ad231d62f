"""`InspectionResult`: what the scorer found in one image, as written to ``anomap:results[:<line>]``."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.ids import CameraId, JobId, LineId, ModelVersion, S3RefStr

MAX_REGIONS = 64


class Region(BaseModel):
    """A connected region of the thresholded anomaly map, in pixel coordinates of the input image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    area: int = Field(ge=1, description="pixels above the pixel threshold")
    peak_score: float = Field(description="maximum normalised score inside the region (1.0 = threshold)")


class InspectionResult(BaseModel):
    """The answer for one `InspectionJob`.

    Scores are normalised so that 1.0 means "at the model's threshold"; ``is_anomalous`` is
    ``image_score >= 1.0``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    job_id: JobId
    camera_id: CameraId
    line: LineId
    model_version: ModelVersion
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    image_score: float = Field(description="normalised image score, 1.0 = image threshold")
    raw_image_score: float
    is_anomalous: bool
    pixel_threshold: float
    image_threshold: float
    regions: list[Region] = Field(default_factory=list, max_length=MAX_REGIONS)
    regions_truncated: bool = False
    map_ref: S3RefStr = Field(
        description="anomaly map, raw units, .npz with array 'map' (float16; float32 where a value does not fit)"
    )
    overlay_ref: S3RefStr = Field(description="JPEG overlay for people (the .npz map holds the numbers)")
    captured_at: AwareDatetime
    published_at: AwareDatetime
    scored_at: AwareDatetime
    latency_ms: float = Field(ge=0, description="published_at -> result written")
    stage_ms: dict[Literal["decode", "score", "store"], float] = Field(default_factory=dict)
