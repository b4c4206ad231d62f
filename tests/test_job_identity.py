"""One answer per entry, one result per job id, when entries and ids go wrong: the same ``job_id`` twice at
once, an entry trimmed away while pending, an entry that fails at every try, an oversized referenced
object, equal entry ids on two lines. Real Valkey and SeaweedFS; jobs are scored in this process
(`LocalInspector` on a small model), so no Ray is needed.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import redis
from helpers import register_small_model, running, small_png

from schemas import DeadLetter, DeadReason, InspectionJob, InspectionResult, Settings, StreamNames
from schemas.stream import encode_job_entry
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.store import ObjectStore, ObjectTooLarge
from workers.consumer import ConsumerConfig, Outcome, StreamConsumer
from workers.group_reader import GroupReader
from workers.inspection import Inspector, LocalInspector, ScoredImage
from workers.publisher import publish_job
from workers.results import read_dead_letters, read_results
from workers.stream_scripts import COMMIT_RESULT, DONE_BY_ANOTHER_ENTRY, TAKE_JOB


@pytest.fixture
def names() -> StreamNames:
    return StreamNames(f"id{uuid.uuid4().hex[:6]}")


@pytest.fixture
def inspector(object_store: ObjectStore) -> LocalInspector:
    card = register_small_model(object_store, "metal")
    _, weights = ModelRegistry(object_store, "metal").load(card.version)
    return LocalInspector(PatchModel.from_safetensors(card, weights, device="cpu"))


class GatedInspector:
    """A real inspector that waits for ``gate`` before scoring, so that a job stays in progress."""

    def __init__(self, inner: Inspector) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def __call__(self, image: np.ndarray, pixel_threshold: float | None = None, line: str = "default") -> ScoredImage:
        self.waiting.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner(image, pixel_threshold, line)


class FailingInspector:
    """An inspector whose every call fails as a broken scorer's would."""

    def __call__(self, image: np.ndarray, pixel_threshold: float | None = None, line: str = "default") -> ScoredImage:
        msg = "scorer exploded"
        raise RuntimeError(msg)


def _consumer(
    client: redis.Redis, store: ObjectStore, inspector: Inspector, names: StreamNames, **options: object
) -> StreamConsumer:
    config = ConsumerConfig(consumer="c", block_ms=50, claim_every_s=0.2, **options)  # type: ignore[arg-type]
    consumer = StreamConsumer(client, store, inspector, names, config)
    consumer.ensure_groups()
    return consumer


def _read(client: redis.Redis, names: StreamNames, consumer: str = "c", count: int = 10) -> list[tuple[str, dict]]:
    reply = client.xreadgroup(names.scorer_group, consumer, {names.jobs(): ">"}, count=count)
    return [(entry_id.decode(), fields) for entry_id, fields in reply[0][1]] if reply else []


def _entry(client: redis.Redis, names: StreamNames, line: str) -> dict:
    """Deliver the next entry of ``line``'s stream to consumer ``c``; its fields."""
    reply = client.xreadgroup(names.scorer_group, "c", {names.jobs(line): ">"}, count=1)
    return reply[0][1][0][1]


def _answers(client: redis.Redis, names: StreamNames) -> tuple[list[InspectionResult], list[DeadLetter]]:
    return (
        [result for _, result in read_results(client, names)],
        [letter for _, letter in read_dead_letters(client, names)],
    )


def _wait_for(client: redis.Redis, names: StreamNames, answers: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.xlen(names.results()) + client.xlen(names.dead) < answers:
        assert time.monotonic() < deadline, f"timed out waiting for {answers} answers"
        time.sleep(0.05)
    time.sleep(0.3)  # a third answer, if there were one, would show up now


# ---- the same job id twice --------------------------------------------------------------------------
def test_the_same_job_id_published_twice_at_once_gets_one_result_and_one_duplicate_letter(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    # a camera that published again after a lost reply: both entries are read in one go and scored side by side
    for _ in range(2):
        publish_job(redis_client, names, InspectionJob(job_id="cam01-again"), image=small_png(1))
    consumer = _consumer(redis_client, object_store, inspector, names, max_in_flight=2)
    with running(consumer):
        _wait_for(redis_client, names, 2)
    results, dead = _answers(redis_client, names)
    assert [result.job_id for result in results] == ["cam01-again"]
    assert [(letter.job_id, letter.reason) for letter in dead] == [("cam01-again", DeadReason.DUPLICATE_JOB)]
    assert redis_client.xpending(names.jobs(), names.scorer_group)["pending"] == 0
    assert redis_client.get(names.owner_marker("cam01-again")) is None  # released with the result


def test_a_second_entry_for_a_job_in_progress_is_turned_away_before_it_is_scored(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    gated = GatedInspector(inspector)
    consumer = _consumer(redis_client, object_store, gated, names)
    first = publish_job(redis_client, names, InspectionJob(job_id="cam02-1"), image=small_png(2))
    second = publish_job(redis_client, names, InspectionJob(job_id="cam02-1"), image=small_png(3))
    (_, first_fields), (_, second_fields) = _read(redis_client, names)
    outcome: list[Outcome] = []
    scoring = threading.Thread(
        target=lambda: outcome.append(consumer.process_entry(names.jobs(), first, first_fields, 1))
    )
    scoring.start()
    assert gated.waiting.wait(30)  # the first entry holds the job and is being scored
    assert consumer.process_entry(names.jobs(), second, second_fields, 1) is Outcome.DEAD
    gated.gate.set()
    scoring.join(30)
    assert outcome == [Outcome.RESULT]
    results, dead = _answers(redis_client, names)
    assert [result.job_id for result in results] == ["cam02-1"]
    [letter] = dead
    assert (letter.entry_id, letter.reason) == (second, DeadReason.DUPLICATE_JOB)
    assert f"being scored from entry {first}" in letter.detail
    # the first entry's map is the one stored: the second never wrote one over it
    assert results[0].map_ref.endswith("cam02-1.npz")
    assert redis_client.xpending(names.jobs(), names.scorer_group)["pending"] == 0


def test_a_job_id_is_free_again_after_its_entry_is_dead_lettered(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    consumer = _consumer(redis_client, object_store, inspector, names)
    bad = publish_job(redis_client, names, InspectionJob(job_id="cam03-1"), image=b"not an image at all")
    [(_, fields)] = _read(redis_client, names)
    assert consumer.process_entry(names.jobs(), bad, fields, 1) is Outcome.DEAD  # undecodable
    assert redis_client.get(names.owner_marker("cam03-1")) is None
    fixed = publish_job(redis_client, names, InspectionJob(job_id="cam03-1"), image=small_png(4))
    [(_, fields)] = _read(redis_client, names)
    assert consumer.process_entry(names.jobs(), fixed, fields, 1) is Outcome.RESULT


def test_the_commit_script_refuses_a_result_when_another_entry_holds_the_job(
    redis_client: redis.Redis, names: StreamNames
) -> None:
    commit = redis_client.register_script(COMMIT_RESULT)
    redis_client.xgroup_create(names.jobs(), names.scorer_group, id="0", mkstream=True)
    redis_client.set(names.done_marker("j1"), "1-1")

    def keys_and_args(entry_id: str) -> dict[str, list]:
        keys = [names.done_marker("j1"), names.results(), names.jobs(), names.settled_marker(names.jobs(), entry_id)]
        keys.append(names.owner_marker("j1"))
        return {"keys": keys, "args": [entry_id, names.scorer_group, 60, 1000, "{}", f"{names.jobs()} {entry_id}"]}

    assert commit(**keys_and_args("2-2")) == DONE_BY_ANOTHER_ENTRY  # nothing written: the caller dead-letters it
    assert redis_client.xlen(names.results()) == 0
    assert redis_client.exists(names.settled_marker(names.jobs(), "2-2")) == 0
    assert commit(**keys_and_args("1-1")) == 0  # the entry that holds the result: acknowledged again, no second one
    assert redis_client.xlen(names.results()) == 0


def test_the_same_job_id_with_equal_entry_ids_on_two_lines_is_a_duplicate_not_a_silent_ack(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    """Two lines' streams can hand out the same entry id: the done marker names the stream too, so the
    second line's entry is told apart from the one that holds the result."""
    consumer = _consumer(redis_client, object_store, inspector, names, lines=("press-1", "press-2"))
    entry_id = "1700000000000-0"
    for line in ("press-1", "press-2"):
        job = InspectionJob(job_id="cam09-1", line=line)
        redis_client.xadd(names.jobs(line), encode_job_entry(job, small_png(9)), id=entry_id)
    assert consumer.process_entry(names.jobs("press-1"), entry_id, _entry(redis_client, names, "press-1"), 1) is (
        Outcome.RESULT
    )
    outcome = consumer.process_entry(names.jobs("press-2"), entry_id, _entry(redis_client, names, "press-2"), 1)
    assert outcome is Outcome.DEAD  # the old done marker held the bare id: acknowledged with no answer at all
    [letter] = [letter for _, letter in read_dead_letters(redis_client, names)]
    assert (letter.reason, letter.stream, letter.job_id) == (DeadReason.DUPLICATE_JOB, names.jobs("press-2"), "cam09-1")
    assert f"entry {entry_id} of {names.jobs('press-1')}" in letter.detail
    assert redis_client.get(names.done_marker("cam09-1")) == f"{names.jobs('press-1')} {entry_id}".encode()


def test_taking_a_job_reads_its_done_marker_in_the_same_step(redis_client: redis.Redis, names: StreamNames) -> None:
    """A job whose result was committed between a done check and taking it would be scored again and its
    map written over: the script answers "done" and takes nothing."""
    take = redis_client.register_script(TAKE_JOB)
    keys = [names.done_marker("j2"), names.owner_marker("j2")]
    assert take(keys=keys, args=["s 1-0", 60]) == [b"taken", b"s 1-0"]
    assert take(keys=keys, args=["s 1-0", 60]) == [b"owner", b"s 1-0"]  # a redelivery of the holder
    assert take(keys=keys, args=["s 2-0", 60]) == [b"owner", b"s 1-0"]
    redis_client.delete(names.owner_marker("j2"))
    redis_client.set(names.done_marker("j2"), "s 1-0")
    assert take(keys=keys, args=["s 2-0", 60]) == [b"done", b"s 1-0"]
    assert redis_client.exists(names.owner_marker("j2")) == 0


# ---- entries that cannot be answered normally ----------------------------------------------------
def test_entries_trimmed_away_while_pending_become_trimmed_dead_letters(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    consumer = _consumer(redis_client, object_store, inspector, names, claim_idle_ms=1)
    own = publish_job(redis_client, names, InspectionJob(job_id="cam04-1"), image=small_png(5))
    _read(redis_client, names, consumer="c")  # read by this consumer before a "crash"
    other = publish_job(redis_client, names, InspectionJob(job_id="cam04-2"), image=small_png(6))
    _read(redis_client, names, consumer="crashed")  # read by a consumer that never came back
    redis_client.xtrim(names.jobs(), maxlen=0)  # a publisher's MAXLEN caught up with the backlog
    with running(consumer):
        _wait_for(redis_client, names, 2)
    results, dead = _answers(redis_client, names)
    assert results == []
    assert sorted((letter.entry_id, letter.reason) for letter in dead) == [
        (own, DeadReason.TRIMMED),
        (other, DeadReason.TRIMMED),
    ]
    assert redis_client.xpending(names.jobs(), names.scorer_group)["pending"] == 0


def test_an_entry_that_fails_at_every_try_is_dead_lettered_with_its_last_failure(
    redis_client: redis.Redis, object_store: ObjectStore, names: StreamNames
) -> None:
    consumer = _consumer(
        redis_client,
        object_store,
        FailingInspector(),
        names,
        max_deliveries=2,
        score_retry_s=0.05,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        busy_backoff_max_s=0.02,
    )
    entry = publish_job(redis_client, names, InspectionJob(job_id="cam05-1", line="default"), image=small_png(7))
    [(_, fields)] = _read(redis_client, names)
    for delivery in (1, 2):
        assert consumer.process_entry(names.jobs(), entry, fields, delivery) is Outcome.RETRY
    assert consumer.process_entry(names.jobs(), entry, fields, 3) is Outcome.DEAD
    [letter] = _answers(redis_client, names)[1]
    assert (letter.job_id, letter.reason) == ("cam05-1", DeadReason.TOO_MANY_DELIVERIES)
    assert letter.detail == (
        "delivered 3 times (limit 2) without a result; the last try failed scoring: RuntimeError('scorer exploded')"
    )


def test_a_referenced_object_over_the_limit_is_refused_without_reading_it(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    object_store.put_bytes("images/cam06/big.png", small_png(8))
    size = len(small_png(8))
    consumer = _consumer(redis_client, object_store, inspector, names, max_image_ref_bytes=size - 1)
    ref = object_store.ref("images/cam06/big.png")
    entry = publish_job(redis_client, names, InspectionJob(job_id="cam06-1", image_ref=ref))
    [(_, fields)] = _read(redis_client, names)
    assert consumer.process_entry(names.jobs(), entry, fields, 1) is Outcome.DEAD
    [letter] = _answers(redis_client, names)[1]
    assert letter.reason is DeadReason.PAYLOAD_TOO_LARGE
    assert letter.detail == f"{ref} is {size} bytes; at most {size - 1} are allowed"
    with pytest.raises(ObjectTooLarge):
        object_store.get_bytes("images/cam06/big.png", max_bytes=size - 1)
    assert object_store.get_bytes("images/cam06/big.png", max_bytes=size) == small_png(8)
    # refused on its declared length: a streamed read would stop after its first 1 MiB chunk and say so
    object_store.put_bytes("images/cam06/huge.bin", bytes(3 << 20))
    with pytest.raises(ObjectTooLarge) as refused:
        object_store.get_bytes("images/cam06/huge.bin", max_bytes=1000)
    assert refused.value.size == 3 << 20


def test_an_entry_deleted_while_its_try_fails_gets_a_dead_letter_instead_of_vanishing(
    redis_client: redis.Redis, object_store: ObjectStore, names: StreamNames
) -> None:
    """``XCLAIM`` (the consumer keeping its entries) and ``XAUTOCLAIM`` drop an entry deleted from its stream
    from the pending list: a try that then fails has no later delivery to wait for."""
    consumer = _consumer(redis_client, object_store, FailingInspector(), names, score_retry_s=0.1)
    entry = publish_job(redis_client, names, InspectionJob(job_id="cam10-1"), image=small_png(10))
    [(_, fields)] = _read(redis_client, names)
    redis_client.xdel(names.jobs(), entry)  # an operator, or a publisher's MAXLEN
    redis_client.xclaim(names.jobs(), names.scorer_group, "c", 0, [entry], justid=True)  # keep_claimed's call
    assert not consumer.reader.is_pending(names.jobs(), entry)
    assert consumer._run_one((names.jobs(), entry, fields, 1)) is Outcome.DEAD
    [letter] = _answers(redis_client, names)[1]
    assert (letter.reason, letter.entry_id, letter.job_id) == (DeadReason.TRIMMED, entry, "cam10-1")
    assert "scorer exploded" in letter.detail, "the dead letter says why the last try failed"
    still = publish_job(redis_client, names, InspectionJob(job_id="cam10-2"), image=small_png(11))
    [(_, fields)] = _read(redis_client, names)
    assert consumer._run_one((names.jobs(), still, fields, 1)) is Outcome.RETRY  # pending: a later try comes


def test_an_entry_still_in_its_stream_is_left_for_a_later_delivery_even_if_no_pending_list_has_it(
    redis_client: redis.Redis, object_store: ObjectStore, names: StreamNames
) -> None:
    """A Redis restarted from an AOF that lost the read which delivered an entry: the entry is intact and is
    delivered again as a new one, so a failed try must not answer it with a dead letter."""
    consumer = _consumer(redis_client, object_store, FailingInspector(), names, score_retry_s=0.1)
    entry = publish_job(redis_client, names, InspectionJob(job_id="cam12-1"), image=small_png(12))
    [(_, fields)] = _read(redis_client, names)
    redis_client.xgroup_destroy(names.jobs(), names.scorer_group)  # the group as it was before the read
    redis_client.xgroup_create(names.jobs(), names.scorer_group, id="0")
    assert consumer._run_one((names.jobs(), entry, fields, 1)) is Outcome.RETRY
    assert _answers(redis_client, names) == ([], [])
    assert [eid for eid, _ in _read(redis_client, names)] == [entry]  # delivered again


def test_a_held_entry_deleted_meanwhile_is_answered_at_stop(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    """Keeping a held entry claimed drops it from the pending list once it is deleted from its stream; at
    stop the consumer, which will not run it, answers it instead of leaving nothing behind."""
    consumer = _consumer(redis_client, object_store, inspector, names, lines=("press-1", "press-2"))
    consumer.reader.start()
    consumer.reader.own_pending(10, set())
    for n, line in enumerate(("press-1", "press-2")):
        publish_job(redis_client, names, InspectionJob(job_id=f"cam13-{n}", line=line), image=small_png(13))
    [_] = consumer.reader.read_new(1, 10, set())
    [(stream, held)] = consumer.reader.held
    redis_client.xdel(stream, held)
    consumer._keep_claimed()
    assert not consumer.reader.is_pending(stream, held)
    consumer._settle_held()
    [letter] = _answers(redis_client, names)[1]
    assert (letter.reason, letter.stream, letter.entry_id) == (DeadReason.TRIMMED, stream, held)
    assert letter.job_id in {"cam13-0", "cam13-1"}
    assert consumer.reader.held == []


def test_a_job_on_another_lines_stream_is_an_invalid_entry(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    """`publish_job` puts a job on its line's stream; one written there by hand for another line would be
    scored with that line's model and answered on its results stream."""
    consumer = _consumer(redis_client, object_store, inspector, names)
    entry = redis_client.xadd(names.jobs(), encode_job_entry(InspectionJob(job_id="cam11-1", line="press-9"), b"x"))
    [(_, fields)] = _read(redis_client, names)
    assert consumer.process_entry(names.jobs(), entry.decode(), fields, 1) is Outcome.DEAD
    [letter] = _answers(redis_client, names)[1]
    assert (letter.reason, letter.job_id, letter.line) == (DeadReason.INVALID_ENTRY, "cam11-1", "default")
    assert letter.detail == f"the job names line 'press-9' but is on {names.jobs()}, the stream of line 'default'"
    assert redis_client.xlen(names.results("press-9")) == 0


def test_entries_held_for_later_are_kept_claimed(redis_client: redis.Redis, names: StreamNames) -> None:
    """Entries a read delivered beyond its limit wait in the reader; their idle time is reset with those in
    flight, so another consumer does not reclaim (and score again) what this one holds."""
    streams = [names.jobs("press-1"), names.jobs("press-2")]
    reader = GroupReader(redis_client, names, "c", streams, claim_idle_ms=60_000)
    reader.ensure_groups()
    reader.start()
    reader.own_pending(10, set())
    for stream in streams:  # one read of both streams delivers two entries; its limit is one
        redis_client.xadd(stream, {b"job": b"{}"})
    [first] = reader.read_new(1, 10, set())
    [held] = reader.held
    time.sleep(0.4)
    reader.keep_claimed([])
    [info] = redis_client.xpending_range(held[0], names.scorer_group, min=held[1], max=held[1], count=1)
    assert info["time_since_delivered"] < 400
    [info] = redis_client.xpending_range(first[0], names.scorer_group, min=first[1], max=first[1], count=1)
    assert info["time_since_delivered"] >= 400  # neither in flight nor held: left alone


# ---- several lines ---------------------------------------------------------------------------------
def test_equal_entry_ids_on_two_lines_are_two_entries_and_a_read_never_exceeds_its_limit(
    redis_client: redis.Redis, names: StreamNames
) -> None:
    streams = [names.jobs("press-1"), names.jobs("press-2")]
    reader = GroupReader(redis_client, names, "c", streams, claim_idle_ms=60_000)
    reader.ensure_groups()
    reader.start()
    assert reader.own_pending(10, set()) == []  # nothing read before
    for stream in streams:  # two lines' streams can hand out the same id in the same millisecond
        redis_client.xadd(stream, {b"job": b"{}"}, id="1700000000000-0")
    [first] = reader.read_new(1, 10, set())
    assert reader.has_backlog  # the second line's entry was delivered too, and is held
    in_flight = {(first[0], first[1])}
    [second] = reader.own_pending(1, in_flight)
    assert {first[0], second[0]} == set(streams)
    assert first[1] == second[1] == "1700000000000-0"
    assert not reader.has_backlog
    assert reader.read_new(10, 10, in_flight | {(second[0], second[1])}) == []


def test_a_consumer_adds_its_lines_to_the_line_set(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    """`anomap status` finds the lines a consumer serves even before any job was published on them."""
    _consumer(redis_client, object_store, inspector, names, lines=("default", "press-7"))
    assert redis_client.smembers(names.lines) == {b"default", b"press-7"}


def test_the_done_marker_lives_as_long_as_the_configured_ttl(
    redis_client: redis.Redis, object_store: ObjectStore, inspector: LocalInspector, names: StreamNames
) -> None:
    """ANOMAP_DONE_TTL_S reaches the marker through the service's consumer config (`anomap serve` and the
    consumers app build theirs with `ConsumerConfig.for_service`): operators shorten it to bound Redis memory."""
    publish_job(redis_client, names, InspectionJob(job_id="cam01-ttl"), image=small_png(1))
    config = ConsumerConfig.for_service(Settings.from_env({"ANOMAP_DONE_TTL_S": "7200"}), "c", ("default",))
    consumer = StreamConsumer(redis_client, object_store, inspector, names, config)
    consumer.ensure_groups()
    with running(consumer):
        _wait_for(redis_client, names, 1)
    assert 7000 < redis_client.ttl(names.done_marker("cam01-ttl")) <= 7200
