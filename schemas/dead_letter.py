"""`DeadLetter`: a job that could not be scored (or a confirmation that could not be filed), with the
reason, as written to ``anomap:dead``."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.ids import LineId
from schemas.job import utc_now


class DeadReason(StrEnum):
    """Why a job went to the dead-letter stream. Each value names one problem an operator can fix."""

    INVALID_ENTRY = "invalid_entry"
    """The stream entry lacks the ``job`` field or has fields it should not."""
    INVALID_JSON = "invalid_json"
    INVALID_SCHEMA = "invalid_schema"
    MISSING_IMAGE = "missing_image"
    """Neither inline image bytes nor an ``image_ref``."""
    AMBIGUOUS_IMAGE = "ambiguous_image"
    """Both inline image bytes and an ``image_ref``."""
    PAYLOAD_TOO_LARGE = "payload_too_large"
    EMPTY_IMAGE = "empty_image"
    UNDECODABLE_IMAGE = "undecodable_image"
    IMAGE_TOO_LARGE = "image_too_large"
    """Too many pixels (decompression-bomb guard), a dimension over the limit, or a JPEG whose decoding work
    is out of bounds (more scans or marker segments than any camera writes)."""
    IMAGE_TOO_SMALL = "image_too_small"
    UNSUPPORTED_IMAGE_MODE = "unsupported_image_mode"
    MISSING_OBJECT = "missing_object"
    FORBIDDEN_OBJECT = "forbidden_object"
    """The ``s3://`` object may not be read: its bucket is neither the service's nor in
    ``ANOMAP_REFERENCE_BUCKETS`` (not read at all), or the store refused (``AccessDenied``, an archived object)."""
    DUPLICATE_JOB = "duplicate_job"
    """A different entry already produced a result under the same ``job_id``."""
    TOO_MANY_DELIVERIES = "too_many_deliveries"
    """Delivered more than ``max_deliveries`` times without an answer; the detail says how the last try failed."""
    TRIMMED = "trimmed"
    """The entry was trimmed from its stream (``MAXLEN``) or deleted while pending: its content is gone."""
    SCORING_FAILED = "scoring_failed"
    UNKNOWN_JOB = "unknown_job"
    """A confirmation names a job whose scored image cannot be found (never scored, or another line)."""
    BOX_OUTSIDE_IMAGE = "box_outside_image"
    """A confirmation's box lies entirely outside the job's image."""
    MASK_SIZE_MISMATCH = "mask_size_mismatch"
    """A confirmation's mask is not the size of the job's image."""
    EMPTY_MASK = "empty_mask"
    """A confirmation's mask marks no pixel."""


class DeadLetter(BaseModel):
    """A job that produced no result, or a confirmation that was not filed; ``entry_id`` and ``stream``
    name the original entry (``anomap:jobs[:<line>]`` or ``anomap:confirmations``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    entry_id: str = Field(max_length=64)
    stream: str = Field(max_length=128)
    job_id: str | None = Field(default=None, max_length=128, description="as sent, if it could be read")
    line: LineId | None = None
    reason: DeadReason
    detail: str = Field(max_length=2000)
    delivery_count: int = Field(ge=1)
    dead_at: AwareDatetime = Field(default_factory=utc_now)
