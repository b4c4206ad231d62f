"""The contract of anomap: pydantic models for every stream message, model cards and settings.

No I/O lives here. Every other layer imports from this one, never the other way round.
"""

from schemas.confirmation import Box, Confirmation, ConfirmationLabel
from schemas.dead_letter import DeadLetter, DeadReason
from schemas.ids import JOB_ID_PATTERN, LINE_PATTERN, S3Ref, parse_s3_ref
from schemas.job import InspectionJob
from schemas.model_card import AbnormalPatchSource, MapMode, ModelCard, ScoreMode, Thresholds
from schemas.model_event import MODEL_EVENT_FIELD, ModelEvent, ModelEventKind
from schemas.result import InspectionResult, Region
from schemas.settings import Settings
from schemas.stream import JobRejected, StreamNames, decode_job_entry, encode_job_entry

__all__ = [
    "JOB_ID_PATTERN",
    "LINE_PATTERN",
    "MODEL_EVENT_FIELD",
    "AbnormalPatchSource",
    "Box",
    "Confirmation",
    "ConfirmationLabel",
    "DeadLetter",
    "DeadReason",
    "InspectionJob",
    "InspectionResult",
    "JobRejected",
    "MapMode",
    "ModelCard",
    "ModelEvent",
    "ModelEventKind",
    "Region",
    "S3Ref",
    "ScoreMode",
    "Settings",
    "StreamNames",
    "Thresholds",
    "decode_job_entry",
    "encode_job_entry",
    "parse_s3_ref",
]
