"""Dead letters listed and re-driven (`workers.dead_letters`, ``anomap dead``): a job dead-lettered for a
missing object is scored once the object is uploaded and its letter re-driven, one for an object in a bucket
references may not name once that bucket is allowed; a trimmed original, a duplicate job and a stream of
another prefix are not sent again. Real Valkey, SeaweedFS and consumer."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import point_cli_at, register_small_model, running, small_png
from typer.testing import CliRunner

from cluster.cli import app
from schemas import DeadLetter, DeadReason, InspectionJob, Settings, StreamNames
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from workers.consumer import ConsumerConfig, StreamConsumer
from workers.dead_letters import Redrive, dead_letters, matches, redrivable_stream, redrive
from workers.inspection import LocalInspector
from workers.publisher import image_key, publish_job
from workers.results import read_results

runner = CliRunner()


@pytest.fixture
def names() -> StreamNames:
    return StreamNames(f"dl{uuid.uuid4().hex[:6]}")


@contextlib.contextmanager
def consumer_running(client: redis.Redis, store: ObjectStore, names: StreamNames) -> Iterator[None]:
    """A real stream consumer with an in-process inspector, in a thread; drained and stopped on exit."""
    card = register_small_model(store, "metal")
    _, weights = ModelRegistry(store, "metal").load(card.version)
    inspector = LocalInspector(PatchModel.from_safetensors(card, weights, device="cpu"))
    consumer = StreamConsumer(
        client, store, inspector, names, ConsumerConfig(consumer="c", block_ms=50, claim_every_s=0.2)
    )
    consumer.ensure_groups()
    with running(consumer):
        yield


def test_a_reference_to_another_bucket_is_a_forbidden_object_until_that_bucket_is_allowed(
    redis_client: redis.Redis, object_store: ObjectStore, names: StreamNames
) -> None:
    """A camera's ``image_ref`` may name only the service's bucket and ``ANOMAP_REFERENCE_BUCKETS``: another is a
    ``forbidden_object`` dead letter at the first delivery, and the object is not read. With the bucket
    allowed, the re-driven job is scored."""
    cams = ObjectStore(object_store.client, f"{object_store.bucket}-cams")
    cams.ensure_bucket()
    try:
        cams.put_bytes("cam01/0001.png", small_png(3), "image/png")
        job = InspectionJob(job_id="cam01-0001", camera_id="cam01", image_ref=cams.ref("cam01/0001.png"))
        publish_job(redis_client, names, job)
        with consumer_running(redis_client, object_store, names):
            _wait_for(redis_client, names, results=0, dead=1)
        ((dead_id, letter),) = dead_letters(redis_client, names)
        assert (letter.reason, letter.delivery_count) == (DeadReason.FORBIDDEN_OBJECT, 1)
        assert f"bucket {cams.bucket!r}" in letter.detail and "ANOMAP_REFERENCE_BUCKETS (none)" in letter.detail

        allowed = ObjectStore(object_store.client, object_store.bucket, frozenset({cams.bucket}))
        assert redrive(redis_client, names, dead_id, letter)[0] is Redrive.REDRIVEN
        with consumer_running(redis_client, allowed, names):
            _wait_for(redis_client, names, results=1, dead=0)
        assert [result.job_id for _, result in read_results(redis_client, names)] == ["cam01-0001"]
    finally:
        cams.delete("cam01/0001.png")
        cams.client.remove_bucket(cams.bucket)


def test_settings_name_the_buckets_references_may_name() -> None:
    settings = Settings.from_env({"ANOMAP_REFERENCE_BUCKETS": "cams-a, cams-b,"})
    assert settings.reference_buckets == ("cams-a", "cams-b")
    with pytest.raises(ValueError, match="ANOMAP_REFERENCE_BUCKETS"):
        Settings.from_env({"ANOMAP_REFERENCE_BUCKETS": "cams-a,Not_A_Bucket"})


def _wait_for(client: redis.Redis, names: StreamNames, results: int, dead: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.xlen(names.results()) < results or client.xlen(names.dead) < dead:
        assert time.monotonic() < deadline, f"timed out waiting for {results} results and {dead} dead letters"
        time.sleep(0.05)


def _cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings, store: ObjectStore, names: StreamNames, tmp: Path):
    point_cli_at(monkeypatch, settings, store.bucket, tmp)
    monkeypatch.setenv("ANOMAP_STREAM_PREFIX", names.prefix)


def test_a_missing_object_job_is_scored_after_its_upload_and_redrive(
    redis_client: redis.Redis,
    object_store: ObjectStore,
    stack_settings: Settings,
    names: StreamNames,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    missing = InspectionJob(job_id="cam01-late", camera_id="cam01")
    missing = missing.model_copy(update={"image_ref": object_store.ref(image_key(missing))})
    publish_job(redis_client, names, missing)
    publish_job(redis_client, names, InspectionJob(job_id="cam01-junk"), image=b"not an image at all")
    with consumer_running(redis_client, object_store, names):
        _wait_for(redis_client, names, results=0, dead=2)
    _cli_env(monkeypatch, stack_settings, object_store, names, tmp_path)

    listed = runner.invoke(app, ["dead", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert {(row["job_id"], row["reason"]) for row in rows} == {
        ("cam01-late", "missing_object"),
        ("cam01-junk", "undecodable_image"),
    }
    text = runner.invoke(app, ["dead", "list", "--reason", "missing_object"])
    assert "cam01-late" in text.stdout and "cam01-junk" not in text.stdout
    assert "1 shown of 1 matching (missing_object 1)" in text.stdout

    dry = runner.invoke(app, ["dead", "redrive", "--reason", "missing_object", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would be sent again" in dry.stdout and redis_client.xlen(names.dead) == 2

    object_store.put_bytes(image_key(missing), small_png(5), "image/png")  # the camera's upload, late
    sent = runner.invoke(app, ["dead", "redrive", "--reason", "missing_object"])
    assert sent.exit_code == 0, sent.output
    assert "re-drove 1 of 1" in sent.output
    with consumer_running(redis_client, object_store, names):
        _wait_for(redis_client, names, results=1, dead=1)
    assert [result.job_id for _, result in read_results(redis_client, names)] == ["cam01-late"]
    assert [letter.job_id for _, letter in dead_letters(redis_client, names)] == ["cam01-junk"]
    again = runner.invoke(app, ["dead", "redrive", "--reason", "missing_object"])
    assert again.exit_code == 0 and "re-drove 0 of 0" in again.output


def test_what_cannot_be_sent_again_is_refused_and_the_letter_stays(
    redis_client: redis.Redis, names: StreamNames
) -> None:
    entry = publish_job(redis_client, names, InspectionJob(job_id="cam01-gone"), image=b"x")
    redis_client.xdel(names.jobs(), entry)

    def letter(reason: DeadReason, stream: str, entry_id: str) -> tuple[str, DeadLetter]:
        dead = DeadLetter(
            entry_id=entry_id, stream=stream, job_id="cam01-gone", reason=reason, detail="d", delivery_count=1
        )
        return redis_client.xadd(names.dead, {b"dead": dead.model_dump_json().encode()}).decode(), dead

    trimmed = letter(DeadReason.UNDECODABLE_IMAGE, names.jobs(), entry)
    assert redrive(redis_client, names, *trimmed) == (Redrive.TRIMMED, None)
    duplicate = letter(DeadReason.DUPLICATE_JOB, names.jobs(), entry)
    assert redrive(redis_client, names, *duplicate) == (Redrive.REFUSED, None)
    elsewhere = letter(DeadReason.UNDECODABLE_IMAGE, "someone:else", entry)
    assert redrive(redis_client, names, *elsewhere) == (Redrive.REFUSED, None)
    assert redis_client.xlen(names.dead) == 3 and redis_client.xlen(names.jobs()) == 0
    assert not redis_client.exists("someone:else")


def test_a_redrive_run_twice_sends_the_job_once(redis_client: redis.Redis, names: StreamNames) -> None:
    entry = publish_job(redis_client, names, InspectionJob(job_id="cam01-once", line="press-2"), image=b"x")
    stream = names.jobs("press-2")
    dead = DeadLetter(
        entry_id=entry,
        stream=stream,
        job_id="cam01-once",
        line="press-2",
        reason="missing_object",
        detail="d",
        delivery_count=1,
    )
    dead_id = redis_client.xadd(names.dead, {b"dead": dead.model_dump_json().encode()}).decode()
    outcome, new_id = redrive(redis_client, names, dead_id, dead)
    assert outcome is Redrive.REDRIVEN and new_id is not None
    assert redrive(redis_client, names, dead_id, dead) == (Redrive.GONE, None)
    entries = redis_client.xrange(stream)
    assert [e[0].decode() for e in entries] == [entry, new_id]
    assert entries[0][1] == entries[1][1], "the re-driven entry carries the original's fields"


def test_dead_letters_are_read_in_pages_and_unreadable_entries_are_reported(
    redis_client: redis.Redis, names: StreamNames
) -> None:
    for n in range(5):
        dead = DeadLetter(
            entry_id=f"{n}-0", stream=names.jobs(), job_id=f"j{n}", reason="empty_image", detail="d", delivery_count=1
        )
        redis_client.xadd(names.dead, {b"dead": dead.model_dump_json().encode()})
    redis_client.xadd(names.dead, {b"dead": b'{"reason": "from_a_newer_version"}'})
    unreadable: list[str] = []
    read = list(dead_letters(redis_client, names, page=2, unreadable=unreadable))
    assert [letter.job_id for _, letter in read] == [f"j{n}" for n in range(5)]
    assert len(unreadable) == 1


def test_filters_and_streams_a_letter_may_go_back_to() -> None:
    names = StreamNames("anomap")
    letter = DeadLetter(
        entry_id="1-0", stream="anomap:jobs", job_id="j", reason="missing_object", detail="d", delivery_count=1
    )
    assert matches(letter) and matches(letter, {"missing_object"}, {"default"}, {"j"})
    assert not matches(letter, {"empty_image"}) and not matches(letter, lines={"press-2"})
    assert not matches(letter, job_ids={"k"})
    assert redrivable_stream(names, "anomap:jobs") and redrivable_stream(names, "anomap:jobs:press-2")
    assert redrivable_stream(names, "anomap:confirmations")
    assert not redrivable_stream(names, "anomap:jobs:Press 2") and not redrivable_stream(names, "anomap:results")
    assert not redrivable_stream(names, "other:jobs")


def test_redrive_needs_a_filter_and_known_reasons(
    stack_settings: Settings,
    object_store: ObjectStore,
    names: StreamNames,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _cli_env(monkeypatch, stack_settings, object_store, names, tmp_path)
    unfiltered = runner.invoke(app, ["dead", "redrive"])
    assert unfiltered.exit_code == 2 and "--reason, --line, --job, or --all" in unfiltered.output
    unknown = runner.invoke(app, ["dead", "list", "--reason", "missing"])
    assert unknown.exit_code == 2 and "'missing' is not a dead-letter reason" in unknown.output
    assert "missing_object" in unknown.output


def test_a_stream_at_its_cap_takes_no_redriven_entry(redis_client: redis.Redis, names: StreamNames) -> None:
    entry = publish_job(redis_client, names, InspectionJob(job_id="cam01-full"), image=b"x")
    dead = DeadLetter(
        entry_id=entry, stream=names.jobs(), job_id="cam01-full", reason="missing_object", detail="d", delivery_count=1
    )
    dead_id = redis_client.xadd(names.dead, {b"dead": dead.model_dump_json().encode()}).decode()
    assert redrive(redis_client, names, dead_id, dead, maxlen=1) == (Redrive.FULL, None)
    assert redis_client.xlen(names.jobs()) == 1 and redis_client.xlen(names.dead) == 1
    assert redrive(redis_client, names, dead_id, dead, maxlen=2)[0] is Redrive.REDRIVEN
