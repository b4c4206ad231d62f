"""`Confirmation`: an operator's verdict on a scored job, as sent on ``anomap:confirmations``.

An entry on that stream has one field, ``confirmation``, holding the JSON::

    {"job_id": "cam01-000123", "line": "default", "label": "abnormal",
     "boxes": [{"x": 10, "y": 20, "width": 30, "height": 8}], "mask_ref": null, "confirmed_by": "ana"}

Boxes and a mask only make sense for an abnormal image; a normal one (a false alarm) carries neither.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas.ids import JobId, LineId, S3RefStr
from schemas.job import utc_now

CONFIRMATION_FIELD = b"confirmation"
"""The field of an ``anomap:confirmations`` entry that holds the confirmation's JSON."""


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

    @model_validator(mode="after")
    def _marks_only_defects(self) -> Confirmation:
        if self.label is ConfirmationLabel.NORMAL and (self.boxes or self.mask_ref):
            msg = "a normal confirmation carries no boxes and no mask_ref; those mark defects (label abnormal)"
            raise ValueError(msg)
        return self
