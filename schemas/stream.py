"""Stream names and the wire format of a job entry.

A job entry on ``anomap:jobs[:<line>]`` has the fields::

    {b"job": <InspectionJob JSON, utf-8>, b"image": <raw image file bytes>}   # inline
    {b"job": <InspectionJob JSON with image_ref="s3://bucket/key">}          # by reference

`decode_job_entry` turns such fields back into a job or raises `JobRejected` with a `DeadReason`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from schemas.dead_letter import DeadReason
from schemas.envelope import parse_json, peek_ids
from schemas.job import InspectionJob

JOB_FIELD = b"job"
IMAGE_FIELD = b"image"
MAX_ENVELOPE_BYTES = 16 * 1024
MAX_INLINE_IMAGE_BYTES = 16 * 1024 * 1024
MAX_REFERENCED_IMAGE_BYTES = 128 * 1024 * 1024
"""The largest object an ``image_ref`` may name: 4096² pixels (the decoder's limit) of 16-bit RGB stored
uncompressed are 96 MiB; a larger object is refused (``payload_too_large``) before it is read whole."""


class JobRejected(Exception):
    """A job that cannot be scored; carries the dead-letter reason and what was wrong."""

    def __init__(self, reason: DeadReason, detail: str, job_id: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.job_id = job_id


def entry_marker(stream: str, entry_id: str) -> str:
    """``"<stream> <entry id>"``: what a job's owner and done markers hold (ids are unique only per stream)."""
    return f"{stream} {entry_id}"


def parse_entry_marker(marker: str) -> tuple[str | None, str]:
    """``(stream, entry id)`` of an `entry_marker` value; ``(None, id)`` for an older release's bare entry id."""
    stream, _, entry_id = marker.rpartition(" ")
    return (stream or None), entry_id


@dataclass(frozen=True)
class StreamNames:
    """Every stream and group name, derived from one prefix (``anomap`` by default)."""

    prefix: str = "anomap"

    def jobs(self, line: str | None = None) -> str:
        """``anomap:jobs`` or ``anomap:jobs:<line>``."""
        return f"{self.prefix}:jobs" if line in (None, "default") else f"{self.prefix}:jobs:{line}"

    def results(self, line: str | None = None) -> str:
        """``anomap:results`` or ``anomap:results:<line>``."""
        return f"{self.prefix}:results" if line in (None, "default") else f"{self.prefix}:results:{line}"

    @property
    def dead(self) -> str:
        """The dead-letter stream."""
        return f"{self.prefix}:dead"

    @property
    def confirmations(self) -> str:
        """Operators' confirmations."""
        return f"{self.prefix}:confirmations"

    @property
    def models(self) -> str:
        """Model promotions and rollbacks."""
        return f"{self.prefix}:models"

    @property
    def lines(self) -> str:
        """A set of the line ids in use (added by `publish_job` and by each consumer for its lines), so
        `anomap status` need not scan a keyspace of millions of markers to find the line streams."""
        return f"{self.prefix}:lines"

    @property
    def scorer_group(self) -> str:
        """The consumer group that scores jobs."""
        return "scorers"

    @property
    def dataset_group(self) -> str:
        """The consumer group that files confirmations into ``datasets/`` in the object store."""
        return "datasets"

    def done_marker(self, job_id: str) -> str:
        """The key a consumer sets, to ``"<stream> <entry id>"`` (`entry_marker`), when the job's result is written."""
        return f"{self.prefix}:done:{job_id}"

    def owner_marker(self, job_id: str) -> str:
        """The key a consumer sets, to ``"<stream> <entry id>"``, while it scores the job: a second entry with
        the same ``job_id`` in flight at the same time is turned away instead of scored twice."""
        return f"{self.prefix}:owner:{job_id}"

    def settled_marker(self, stream: str, entry_id: str) -> str:
        """The key set when an entry is answered (``result`` or ``dead``): one answer per entry."""
        return f"{self.prefix}:settled:{stream}:{entry_id}"

    def filed_marker(self, line: str, job_id: str) -> str:
        """The key that holds the entry id of the newest confirmation filed for a job of a line."""
        return f"{self.prefix}:filed:{line}:{job_id}"

    def filing_lock(self, line: str, job_id: str) -> str:
        """The key a confirmation reader holds while it files a confirmation of a job of a line: two
        readers never file two confirmations of one job at the same time."""
        return f"{self.prefix}:filing:{line}:{job_id}"

    def failure_marker(self, stream: str, entry_id: str) -> str:
        """The key that keeps why an entry's last try failed, for the dead letter if none succeeds."""
        return f"{self.prefix}:failure:{stream}:{entry_id}"


def encode_job_entry(job: InspectionJob, image: bytes | None = None) -> dict[bytes, bytes]:
    """Fields of a job stream entry: the JSON envelope, plus the image bytes when inline."""
    if (image is None) == (job.image_ref is None):
        msg = "a job carries either inline image bytes or an image_ref, exactly one of them"
        raise ValueError(msg)
    if image is not None and len(image) > MAX_INLINE_IMAGE_BYTES:
        msg = f"inline image is {len(image)} bytes; at most {MAX_INLINE_IMAGE_BYTES} are allowed"
        raise ValueError(msg)
    fields = {JOB_FIELD: job.model_dump_json().encode()}
    if image is not None:
        fields[IMAGE_FIELD] = image
    return fields


def decode_job_entry(fields: Mapping[bytes, bytes]) -> tuple[InspectionJob, bytes | None]:
    """Validate a job entry's fields; return the job and its inline image bytes (or None).

    Raises `JobRejected` naming the problem: a missing or unknown field, invalid JSON, a schema
    violation, a missing, doubled or oversized image.
    """
    unknown = set(fields) - {JOB_FIELD, IMAGE_FIELD}
    if unknown:
        names = sorted(k.decode(errors="replace")[:40] for k in unknown)
        raise JobRejected(DeadReason.INVALID_ENTRY, f"unknown entry fields {names}; expected job, image")
    raw = fields.get(JOB_FIELD)
    if raw is None:
        raise JobRejected(DeadReason.INVALID_ENTRY, "entry has no 'job' field")
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise JobRejected(
            DeadReason.PAYLOAD_TOO_LARGE,
            f"job envelope is {len(raw)} bytes; at most {MAX_ENVELOPE_BYTES} are allowed",
        )
    try:
        payload = parse_json(raw)
    except ValueError as exc:  # not UTF-8 or not JSON (UnicodeDecodeError is a ValueError), or nested too deeply
        raise JobRejected(DeadReason.INVALID_JSON, f"job field is not JSON: {exc}") from exc
    job_id, _ = peek_ids(payload)
    try:
        job = InspectionJob.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg']}" for err in exc.errors())
        raise JobRejected(DeadReason.INVALID_SCHEMA, problems[:1500], job_id) from exc
    image = fields.get(IMAGE_FIELD)
    if image is None and job.image_ref is None:
        raise JobRejected(DeadReason.MISSING_IMAGE, "no inline image and no image_ref", job.job_id)
    if image is not None and job.image_ref is not None:
        raise JobRejected(DeadReason.AMBIGUOUS_IMAGE, "both inline image and image_ref given", job.job_id)
    if image is not None and len(image) > MAX_INLINE_IMAGE_BYTES:
        raise JobRejected(
            DeadReason.PAYLOAD_TOO_LARGE,
            f"inline image is {len(image)} bytes; at most {MAX_INLINE_IMAGE_BYTES} are allowed",
            job.job_id,
        )
    if image is not None and len(image) == 0:
        raise JobRejected(DeadReason.EMPTY_IMAGE, "inline image has zero bytes", job.job_id)
    return job, image
