"""`Confirmation`: an operator's verdict on a scored job, as sent on ``anomap:confirmations``."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.ids import JobId, LineId, S3RefStr
from schemas.job import utc_now


class ConfirmationLabel(StrEnum):
    """What the operator says the image is."""

    ABNORMAL = "abnormal"
    NORMAL = "normal"


class Box(BaseModel):
    """An axis-aligned box around a defect, in pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(ge=1, le=65535)
    height: int = Field(ge=1, le=65535)


class Confirmation(BaseModel):
    """A confirmed label for a job's image; abnormal ones feed the discriminator's abnormal bank."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    job_id: JobId
    line: LineId = "default"
    label: ConfirmationLabel
    boxes: list[Box] = Field(default_factory=list, max_length=256)
    mask_ref: S3RefStr | None = None
    confirmed_by: str | None = Field(default=None, max_length=128)
    confirmed_at: AwareDatetime = Field(default_factory=utc_now)
