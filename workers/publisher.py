"""Publishing image jobs, as a camera (or `anomap publish`) does.

    publish_job(client, names, InspectionJob(job_id="cam01-000001", camera_id="cam01"), image=png_bytes)

A job carries its image inline, or `upload_image` first puts it in the object store and the job
carries an ``s3://`` reference instead.
"""

from __future__ import annotations

import logging

import redis

from schemas import InspectionJob, StreamNames, encode_job_entry
from schemas.job import utc_now
from trainer.store import ObjectStore
from workers.scored_images import image_content_type
from workers.stream_scripts import PUBLISH_JOB

log = logging.getLogger(__name__)

DEFAULT_JOBS_MAXLEN = 100_000
"""A line's job stream holds at most about this many entries. At the cap a publish first trims answered
entries; one that finds no answered entry to trim is refused (`LineBacklogFull`)."""
BACKLOG_FULL = "BACKLOG_FULL"


class LineBacklogFull(Exception):
    """A line's job stream holds ``maxlen`` entries and its oldest are not answered yet: the job was not published."""

    def __init__(self, line: str, held: int, maxlen: int) -> None:
        super().__init__(
            f"line {line!r} holds {held} jobs (at most {maxlen}) and the oldest has no answer yet; the job was not "
            "published: its consumers are behind or stopped (`anomap status`), publish it again later"
        )
        self.line, self.held, self.maxlen = line, held, maxlen


def publish_job(
    client: redis.Redis,
    names: StreamNames,
    job: InspectionJob,
    image: bytes | None = None,
    maxlen: int = DEFAULT_JOBS_MAXLEN,
) -> str:
    """Add a job to its line's job stream, stamped with ``published_at`` = now; returns the entry id.

    The line is also added to the set of lines in use (``names.lines``), which `anomap status` reads.

    The stream keeps up to ``maxlen`` entries, answered ones too (dead letters are re-driven from their
    original entries). At the cap a publish first trims answered entries, the oldest first and never
    one a consumer group has not answered (`workers.stream_scripts.PUBLISH_JOB`, one script on the
    server). When none can be trimmed (the consumers are that far behind, or none has joined the line
    yet), nothing is added and `LineBacklogFull` is raised: the publisher is told, rather than the
    oldest unread job being lost to a trim. `publish_by_reference` also removes a refused job's upload.
    """
    if maxlen < 1:
        msg = f"maxlen must be >= 1, got {maxlen}"
        raise ValueError(msg)
    job = job.model_copy(update={"published_at": utc_now()})
    fields = [part for pair in encode_job_entry(job, image).items() for part in pair]
    script = client.register_script(PUBLISH_JOB)
    try:
        entry_id = script(keys=[names.jobs(job.line), names.lines], args=[maxlen, job.line, *fields])
    except redis.ResponseError as exc:
        code, _, held = str(exc).partition(" ")
        if code != BACKLOG_FULL:
            raise
        raise LineBacklogFull(job.line, int(held), maxlen) from exc
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def image_key(job: InspectionJob, suffix: str = ".png") -> str:
    """Where a camera uploads a job's image: ``images/<line>/<camera>/<job_id><suffix>``."""
    return f"images/{job.line}/{job.camera_id}/{job.job_id}{suffix}"


def upload_image(store: ObjectStore, key: str, image: bytes, content_type: str | None = None) -> str:
    """Upload image bytes and return the ``s3://`` reference a job can carry; the content type defaults to
    the one the bytes' signature names (`workers.scored_images.image_content_type`)."""
    store.put_bytes(key, image, content_type or image_content_type(image))
    return store.ref(key)


def publish_by_reference(
    client: redis.Redis,
    names: StreamNames,
    store: ObjectStore,
    job: InspectionJob,
    image: bytes,
    suffix: str = ".png",
    maxlen: int = DEFAULT_JOBS_MAXLEN,
) -> tuple[str, str]:
    """Upload ``image`` to `image_key` and publish ``job`` carrying its ``s3://`` reference; returns
    (entry id, reference).

    A publish the line refuses (`LineBacklogFull`: certain that no job was added) deletes the upload
    before the refusal is raised, so a refused job leaves nothing behind, unless the object was there
    before this call: a retry of a job whose earlier publish may have been added (a connection error)
    must not take that entry's image away. Any other publish error keeps the upload.
    """
    key = image_key(job, suffix)
    existed = store.exists(key)
    ref = upload_image(store, key, image)
    try:
        entry_id = publish_job(client, names, job.model_copy(update={"image_ref": ref}), maxlen=maxlen)
    except LineBacklogFull:
        if existed:
            raise
        try:
            store.delete(key)
        except Exception as exc:  # the refusal is what the caller must hear; the orphan is only logged
            log.warning("could not remove %s after its publish was refused: %r", ref, exc)
        raise
    return entry_id, ref
