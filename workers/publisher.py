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

DEFAULT_JOBS_MAXLEN = 100_000


def publish_job(
    client: redis.Redis,
    names: StreamNames,
    job: InspectionJob,
    image: bytes | None = None,
    maxlen: int = DEFAULT_JOBS_MAXLEN,
) -> str:
    """Add a job to its line's job stream, stamped with ``published_at`` = now; returns the entry id.

    The line is also added to the set of lines in use (``names.lines``), which `anomap status` reads.

    The stream is trimmed approximately to ``maxlen`` entries: size it well above the backlog a
    line can build up, since trimming drops the oldest entries, read or not.
    """
    job = job.model_copy(update={"published_at": utc_now()})
    pipe = client.pipeline(transaction=False)  # one round trip: the job, and its line in the line set
    pipe.xadd(names.jobs(job.line), encode_job_entry(job, image), maxlen=maxlen, approximate=True)
    pipe.sadd(names.lines, job.line)
    entry_id, _ = pipe.execute()
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def image_key(job: InspectionJob, suffix: str = ".png") -> str:
    """Where a camera uploads a job's image: ``images/<line>/<camera>/<job_id><suffix>``."""
    return f"images/{job.line}/{job.camera_id}/{job.job_id}{suffix}"


def upload_image(store: ObjectStore, key: str, image: bytes, content_type: str = "image/png") -> str:
    """Upload image bytes and return the ``s3://`` reference a job can carry."""
    store.put_bytes(key, image, content_type)
    return store.ref(key)
