"""Publishing never loses a job to trimming: at its cap a line's stream trims its oldest entry only when
that one is answered, and a publish that would trim an unanswered job is refused. Real Valkey."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
import redis
from PIL import Image

from schemas import InspectionJob, StreamNames
from schemas.stream import decode_job_entry
from trainer.imaging import encode_png
from trainer.store import ObjectStore
from workers.publisher import LineBacklogFull, image_key, publish_by_reference, publish_job


@pytest.fixture
def names() -> StreamNames:
    return StreamNames(f"pub{uuid.uuid4().hex[:6]}")


def _job(n: int, line: str = "default") -> InspectionJob:
    return InspectionJob(job_id=f"cam01-{n:03d}", line=line)


def _job_ids(client: redis.Redis, stream: str) -> list[str]:
    return [decode_job_entry(fields)[0].job_id for _, fields in client.xrange(stream)]


IMAGE = bytes(5000)
"""Larger than a stream node's 4096 bytes: one entry per node, so the trims below are exact (the server
trims whole nodes only)."""


def test_at_its_cap_a_stream_trims_answered_jobs_only_and_refuses_the_rest(
    redis_client: redis.Redis, names: StreamNames
) -> None:
    """Below its cap a stream keeps every entry; at the cap a publish trims the oldest answered ones first."""
    stream, group = names.jobs(), names.scorer_group
    redis_client.xgroup_create(stream, group, id="0", mkstream=True)
    entries = [publish_job(redis_client, names, _job(n), image=IMAGE, maxlen=4) for n in range(4)]
    redis_client.xreadgroup(group, "c", {stream: ">"}, count=3)  # three delivered ...
    redis_client.xack(stream, group, entries[0], entries[2])  # ... two answered; 1 stays pending, 3 unread
    publish_job(redis_client, names, _job(4), image=IMAGE, maxlen=4)  # trims 0, answered
    assert _job_ids(redis_client, stream) == ["cam01-001", "cam01-002", "cam01-003", "cam01-004"]
    with pytest.raises(LineBacklogFull) as refused:  # would trim 1, pending
        publish_job(redis_client, names, _job(5), image=IMAGE, maxlen=4)
    assert (refused.value.line, refused.value.held, refused.value.maxlen) == ("default", 4, 4)
    assert "line 'default' holds 4 jobs (at most 4) and the oldest has no answer yet" in str(refused.value)
    assert "the job was not published" in str(refused.value)
    redis_client.xack(stream, group, entries[1])
    publish_job(redis_client, names, _job(5), image=IMAGE, maxlen=4)  # trims 1 and 2, both answered now
    assert _job_ids(redis_client, stream) == ["cam01-003", "cam01-004", "cam01-005"]
    publish_job(redis_client, names, _job(6), image=IMAGE, maxlen=4)  # below the cap again: nothing trimmed
    with pytest.raises(LineBacklogFull):  # would trim 3, never read
        publish_job(redis_client, names, _job(7), image=IMAGE, maxlen=4)
    assert _job_ids(redis_client, stream) == ["cam01-003", "cam01-004", "cam01-005", "cam01-006"]
    assert redis_client.smembers(names.lines) == {b"default"}
    with pytest.raises(ValueError, match="maxlen must be >= 1, got 0"):
        publish_job(redis_client, names, _job(8), image=IMAGE, maxlen=0)


def test_a_line_without_consumers_yet_keeps_every_job_until_its_cap(
    redis_client: redis.Redis, names: StreamNames
) -> None:
    """Before any consumer created its group nothing is answered: the cap counts every entry."""
    for n in range(3):
        publish_job(redis_client, names, _job(n, "press-4"), image=IMAGE, maxlen=3)
    with pytest.raises(LineBacklogFull):
        publish_job(redis_client, names, _job(3, "press-4"), image=IMAGE, maxlen=3)
    assert _job_ids(redis_client, names.jobs("press-4")) == ["cam01-000", "cam01-001", "cam01-002"]


def test_the_slowest_group_decides_what_is_trimmed(redis_client: redis.Redis, names: StreamNames) -> None:
    """An entry one group answered and another has not even read stays."""
    stream = names.jobs()
    redis_client.xgroup_create(stream, names.scorer_group, id="0", mkstream=True)
    redis_client.xgroup_create(stream, "audit", id="0")
    first = publish_job(redis_client, names, _job(0), image=IMAGE, maxlen=1)
    redis_client.xreadgroup(names.scorer_group, "c", {stream: ">"}, count=1)
    redis_client.xack(stream, names.scorer_group, first)
    with pytest.raises(LineBacklogFull):
        publish_job(redis_client, names, _job(1), image=IMAGE, maxlen=1)
    redis_client.xreadgroup("audit", "a", {stream: ">"}, count=1)
    redis_client.xack(stream, "audit", first)
    publish_job(redis_client, names, _job(1), image=IMAGE, maxlen=1)
    assert _job_ids(redis_client, stream) == ["cam01-001"]


def test_a_refused_publish_by_reference_removes_its_upload(
    redis_client: redis.Redis, object_store: ObjectStore, names: StreamNames
) -> None:
    """The upload of a job the line refuses is deleted (nothing was published that could read it) unless it
    was there before (a retry of a job an earlier entry may hold); an accepted job's image stays, stored with
    the content type its bytes name."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="JPEG")
    jpeg, png = buffer.getvalue(), encode_png(np.zeros((8, 8), np.uint8))
    entry, ref = publish_by_reference(redis_client, names, object_store, _job(0, "ref"), jpeg, ".jpg", maxlen=1)
    stored = object_store.client.stat_object(object_store.bucket, image_key(_job(0, "ref"), ".jpg"))
    assert stored.content_type == "image/jpeg"
    job, _ = decode_job_entry(redis_client.xrange(names.jobs("ref"))[0][1])
    assert (job.image_ref, redis_client.xrange(names.jobs("ref"))[0][0].decode()) == (ref, entry)
    with pytest.raises(LineBacklogFull):
        publish_by_reference(redis_client, names, object_store, _job(1, "ref"), png, ".png", maxlen=1)
    assert not object_store.exists(image_key(_job(1, "ref")))
    assert object_store.exists(image_key(_job(0, "ref"), ".jpg"))
    with pytest.raises(LineBacklogFull):  # the same job again, as after a lost reply: its image stays
        publish_by_reference(redis_client, names, object_store, _job(0, "ref"), jpeg, ".jpg", maxlen=1)
    assert object_store.exists(image_key(_job(0, "ref"), ".jpg"))
