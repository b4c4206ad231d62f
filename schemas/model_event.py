"""`ModelEvent`: a move of a live-model pointer, as written to ``anomap:models`` and kept in the registry.

Every promotion and rollback of a line's live pointer is one event, in the stream (for the Serve app
and operators) and in the pointer's history object (for rollbacks)::

    {"event": "promote", "name": "metal", "line": "default", "version": "v20261130-101500-000000",
     "previous": "v20261129-223015-123456", "reason": "retrain: 5 new confirmations", "at": "..."}

``version`` and ``previous`` name what the line's *own* pointer held after and before the move;
``None`` means the line had no pointer of its own and followed the default line's model.

The retraining controller also announces a candidate it did not promote: a ``rejected`` event names
the candidate in ``version`` and the pointer's unchanged version in ``previous``; the pointer did
not move (``changed`` is False) and the event is not part of the pointer's history.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.ids import LineId, ModelName, ModelVersion
from schemas.job import utc_now

MODEL_EVENT_FIELD = b"event"
"""The field of an ``anomap:models`` entry that holds the event's JSON."""


class ModelEventKind(StrEnum):
    """What happened to a live pointer."""

    PROMOTE = "promote"
    ROLLBACK = "rollback"
    REJECTED = "rejected"
    """A retrained candidate failed its checks; the pointer stayed (see the module docstring)."""


class ModelEvent(BaseModel):
    """One move of the live pointer of ``line`` for model ``name``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    event: ModelEventKind
    name: ModelName
    line: LineId = "default"
    version: ModelVersion | None = Field(description="the pointer's version after the move; None: follows default")
    previous: ModelVersion | None = Field(description="the pointer's version before; None: none of its own")
    reason: str = Field(default="", max_length=500)
    at: AwareDatetime = Field(default_factory=utc_now)

    @property
    def changed(self) -> bool:
        """Whether the pointer moved (a promotion of the version already live, or a rejection, does not)."""
        return self.event is not ModelEventKind.REJECTED and self.version != self.previous
