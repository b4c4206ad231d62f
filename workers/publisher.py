"""Publishing image jobs, as a camera (or `anomap publish`) does.

    publish_job(client, names, InspectionJob(job_id="cam01-000001", camera_id="cam01"), image=png_bytes)

A job carries its image inline, or `upload_image` first puts it in the object store and the job
carries an ``s3://`` reference instead.
"""

from __future__ import annotations

import redis

from schemas import InspectionJob, StreamNames, encode_job_entry
from schemas.job import utc_now
from trainer.store import ObjectStore
from workers.stream_scripts import PUBLISH_JOB

DEFAULT_JOBS_MAXLEN = 100_000
"""A line's job stream holds at most this many entries. At the cap each publish trims the oldest one,
which must be answered: a publish that would trim an unanswered job is refused (`LineBacklogFull`)."""
BACKLOG_FULL = "BACKLOG_FULL"


class LineBacklogFull(Exception):
    """A line's job stream holds ``maxlen`` entries and its oldest is not answered yet: the job was not published."""

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
    original entries); at the cap each publish trims the oldest (`workers.stream_scripts.PUBLISH_JOB`,
    one script on the server). A publish that would trim a job with no answer yet (pending, unread, or
    on a line no consumer has joined) adds nothing and raises `LineBacklogFull`: the publisher is told,
    rather than the oldest unread job being lost to the trim.
    """
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


def upload_image(store: ObjectStore, key: str, image: bytes, content_type: str = "image/png") -> str:
    """Upload image bytes and return the ``s3://`` reference a job can carry."""
    store.put_bytes(key, image, content_type)
    return store.ref(key)
