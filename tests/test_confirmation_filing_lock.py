"""Two readers of the ``datasets`` group never file two confirmations of one job at once, and a job's filed
marker only moves forward: the operator's last word stands. Real Valkey and SeaweedFS."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import redis
from helpers import small_png
from minio import Minio

from schemas import Box, Confirmation, DeadReason, Settings, StreamNames
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind
from workers.confirmations import (
    ConfirmationIngester,
    Filed,
    IngestConfig,
    filed_marker_value,
    filed_order,
    publish_confirmation,
)
from workers.dead_letters import Redrive, redrive
from workers.group_reader import Entry
from workers.results import read_dead_letters
from workers.scored_images import scored_image_key
from workers.stream_scripts import ADVANCE_FILED_MARKER

NAMES = StreamNames()
EARLIER = datetime(2026, 1, 1, tzinfo=UTC)


def _delivered(client: redis.Redis, consumer: str) -> Entry:
    """The next new confirmation entry, delivered to ``consumer`` of the ``datasets`` group."""
    [(stream, [(entry_id, fields)])] = client.xreadgroup(
        NAMES.dataset_group, consumer, {NAMES.confirmations: ">"}, count=1
    )
    return stream.decode(), entry_id.decode(), fields, 1


def _ingester(client: redis.Redis, store: ObjectStore, consumer: str, wait_s: float) -> ConfirmationIngester:
    ingester = ConfirmationIngester(client, store, NAMES, IngestConfig(consumer=consumer, filing_wait_s=wait_s))
    ingester.reader.ensure_groups()
    return ingester


def test_a_reader_waits_while_another_files_the_same_job_then_yields_to_its_newer_confirmation(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    """Reader A holds the older confirmation (normal) while reader B files the newer one (abnormal): A files
    nothing while B holds the job, then finds B's newer entry filed and stands down."""
    job = "lock-1"
    object_store.put_bytes(scored_image_key("default", job), small_png(3, (DefectKind.SCRATCH,)), "image/png")
    reader_a = _ingester(redis_client, object_store, "a", wait_s=20.0)
    later = Confirmation(job_id=job, label="abnormal")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id=job, label="normal", confirmed_at=EARLIER))
    publish_confirmation(redis_client, NAMES, later)
    older, newer = _delivered(redis_client, "a"), _delivered(redis_client, "b")
    lock = NAMES.filing_lock("default", job)
    assert redis_client.set(lock, "reader-b", nx=True, px=60_000)  # B is filing the newer one
    outcome: list[Filed] = []
    waiting = threading.Thread(target=lambda: outcome.append(reader_a.process(older)))
    waiting.start()
    time.sleep(1.0)
    assert list(object_store.list_keys("datasets/default/")) == [], "A filed while B held the job"
    assert not outcome
    b_filed = filed_marker_value(later, newer[1])
    redis_client.set(NAMES.filed_marker("default", job), b_filed)  # B filed its entry ...
    redis_client.delete(lock)  # ... and let go
    waiting.join(timeout=20)
    assert outcome == [Filed.SUPERSEDED]
    assert redis_client.get(NAMES.filed_marker("default", job)) == b_filed.encode()
    assert not redis_client.exists(lock)


def test_a_reader_that_cannot_get_the_job_leaves_the_entry_pending(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    job = "lock-2"
    object_store.put_bytes(scored_image_key("default", job), small_png(4), "image/png")
    reader = _ingester(redis_client, object_store, "c", wait_s=0.3)
    publish_confirmation(redis_client, NAMES, Confirmation(job_id=job, label="normal"))
    entry = _delivered(redis_client, "c")
    redis_client.set(NAMES.filing_lock("default", job), "someone", px=60_000)
    assert reader.process(entry) is Filed.RETRY
    failure = redis_client.get(NAMES.failure_marker(NAMES.confirmations, entry[1]))
    assert failure is not None and b"another reader held" in failure
    pending = redis_client.xpending_range(NAMES.confirmations, NAMES.dataset_group, entry[1], entry[1], 1)
    assert [p["consumer"] for p in pending] == [b"c"]
    assert redis_client.get(NAMES.filing_lock("default", job)) == b"someone", "another's lock is not released"
    redis_client.delete(NAMES.filing_lock("default", job))
    assert reader.process(entry) is Filed.WRITTEN
    assert not redis_client.exists(NAMES.filing_lock("default", job))


def test_the_filed_marker_only_moves_forward_by_confirmation_time_then_entry(redis_client: redis.Redis) -> None:
    advance = redis_client.register_script(ADVANCE_FILED_MARKER)
    marker = NAMES.filed_marker("default", "lock-3")
    assert advance(keys=[marker], args=["5000 200-1", 60]) == 1
    assert advance(keys=[marker], args=["5000 200-0", 60]) == 0
    assert advance(keys=[marker], args=["4999 900-7", 60]) == 0, "confirmed earlier, re-driven later: older"
    assert redis_client.get(marker) == b"5000 200-1"
    assert advance(keys=[marker], args=["5001 100-0", 60]) == 1
    redis_client.set(marker, "7-0")  # an older release's marker: the entry id alone, 7 ms -> 7000 µs
    assert advance(keys=[marker], args=["6999 8-0", 60]) == 0
    assert advance(keys=[marker], args=["7000 8-0", 60]) == 1
    assert 0 < redis_client.ttl(marker) <= 60
    assert filed_order("7000 8-0") > filed_order("7-0") > filed_order("6999 8-0")


def test_a_redriven_confirmation_does_not_overrule_one_the_operator_sent_after_it(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    """C1 (abnormal) is dead-lettered (the job's image was not kept yet); the operator then sends C2 (normal),
    which is filed. Re-driving C1 gives it a new, later entry id, but it stays the older confirmation."""
    job = "lock-5"
    reader = _ingester(redis_client, object_store, "e", wait_s=5.0)
    box = Box(x=1, y=1, width=4, height=4)
    publish_confirmation(redis_client, NAMES, Confirmation(job_id=job, label="abnormal", boxes=[box]))
    assert reader.process(_delivered(redis_client, "e")) is Filed.DEAD
    [(dead_id, letter)] = [(i, d) for i, d in read_dead_letters(redis_client, NAMES) if d.job_id == job]
    assert letter.reason is DeadReason.UNKNOWN_JOB
    object_store.put_bytes(scored_image_key("default", job), small_png(6), "image/png")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id=job, label="normal"))
    assert reader.process(_delivered(redis_client, "e")) is Filed.WRITTEN
    assert redrive(redis_client, NAMES, dead_id, letter)[0] is Redrive.REDRIVEN
    assert reader.process(_delivered(redis_client, "e")) is Filed.SUPERSEDED
    assert list(object_store.list_keys("datasets/default/")) == [f"datasets/default/normal/{job}.png"]


def test_a_confirmation_given_up_after_failed_tries_says_how_the_last_one_failed(
    redis_client: redis.Redis, object_store: ObjectStore, stack_settings: Settings
) -> None:
    """The store refuses the reader's requests (wrong secret key, a real SeaweedFS answer): each try is left
    pending and its error kept; the dead letter that ends it names that error."""
    assert stack_settings.s3_host is not None and stack_settings.s3_access_key is not None
    refused = Minio(
        stack_settings.s3_host,
        access_key=stack_settings.s3_access_key.get_secret_value(),
        secret_key="wrong",
        secure=False,
    )
    reader = ConfirmationIngester(
        redis_client, ObjectStore(refused, object_store.bucket), NAMES, IngestConfig(consumer="d", max_deliveries=1)
    )
    reader.reader.ensure_groups()
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="lock-4", label="normal"))
    stream, entry_id, fields, _ = _delivered(redis_client, "d")
    assert reader.process((stream, entry_id, fields, 1)) is Filed.RETRY
    assert reader.process((stream, entry_id, fields, 2)) is Filed.DEAD
    [letter] = [letter for _, letter in read_dead_letters(redis_client, NAMES) if letter.entry_id == entry_id]
    assert letter.reason is DeadReason.TOO_MANY_DELIVERIES
    assert "the last try failed: S3Error" in letter.detail and "SignatureDoesNotMatch" in letter.detail
