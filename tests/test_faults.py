"""Fault tests: nothing is lost when a consumer, a scorer replica, Redis or the object store fails.

Each test publishes small jobs (128×128, patch 32), breaks something real mid-run (no mocks) and
checks that every job ends with exactly one answer, a result or a dead letter, none twice, and
that nothing is left pending.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import redis
from helpers import register_small_model, small_png, wait_until
from PIL import Image
from ray import serve

from cluster.connections import RAY_ENV, object_store, redis_client
from cluster.processes import ManagedServer
from schemas import DeadReason, InspectionJob, Settings, StreamNames
from schemas.stream import MAX_INLINE_IMAGE_BYTES
from trainer.imaging import encode_png
from workers.consumer import ConsumerConfig, Outcome, StreamConsumer
from workers.publisher import publish_job
from workers.results import read_dead_letters, read_results
from workers.serve_app import APP_NAME, ServeInspector, deploy

pytestmark = pytest.mark.ray
NAMES = StreamNames()
CONSUMER_SCRIPT = Path(__file__).with_name("fault_consumer.py")


@pytest.fixture(scope="module")
def service(stack_settings: Settings, ray_cluster: str) -> Iterator[Settings]:
    settings = stack_settings.model_copy(update={"bucket": f"faults-{uuid.uuid4().hex[:8]}"})
    store = object_store(settings)
    card = register_small_model(store, settings.model_name)
    deploy(settings, card.version, scorer_replicas=2, chunk_patches=32)
    yield settings
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [small_png(seed) for seed in range(4)]


@contextlib.contextmanager
def consuming(settings: Settings, n: int = 1, **options: object) -> Iterator[list[StreamConsumer]]:
    """``n`` consumer threads in this process; stopped (graceful drain) on exit."""
    stop = threading.Event()
    consumers, threads, clients = [], [], []
    inspector = ServeInspector.connect(timeout_s=60)
    for i in range(n):
        client = redis_client(settings)
        config = ConsumerConfig(consumer=f"c{i}", block_ms=100, claim_every_s=0.5, **options)  # type: ignore[arg-type]
        consumer = StreamConsumer(client, object_store(settings), inspector, NAMES, config)
        thread = threading.Thread(target=consumer.run, args=(stop,), name=config.consumer, daemon=True)
        thread.start()
        consumers.append(consumer)
        threads.append(thread)
        clients.append(client)
    try:
        yield consumers
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
        for client in clients:
            client.close()
    assert not any(thread.is_alive() for thread in threads), "a consumer did not drain and stop"


def publish_many(client: redis.Redis, images: list[bytes], n: int, prefix: str) -> list[str]:
    job_ids = [f"{prefix}-{i:04d}" for i in range(n)]
    for i, job_id in enumerate(job_ids):
        publish_job(client, NAMES, InspectionJob(job_id=job_id, camera_id="cam01"), image=images[i % len(images)])
    return job_ids


def n_answers(client: redis.Redis) -> int:
    return client.xlen(NAMES.results()) + client.xlen(NAMES.dead)


def assert_one_result_each(client: redis.Redis, job_ids: list[str]) -> None:
    """Every job has exactly one result, none has a dead letter, nothing is pending."""
    results = Counter(result.job_id for _, result in read_results(client, NAMES))
    dead = [(letter.job_id, letter.reason.value) for _, letter in read_dead_letters(client, NAMES)]
    missing = sorted(set(job_ids) - set(results))
    twice = sorted(job_id for job_id, count in results.items() if count > 1)
    assert (missing, twice, dead) == ([], [], []), f"missing {missing[:10]}, twice {twice[:10]}, dead {dead[:10]}"
    assert sorted(results) == sorted(job_ids)
    assert client.xpending(NAMES.jobs(), NAMES.scorer_group)["pending"] == 0


def total(consumers: list[StreamConsumer], outcome: Outcome) -> int:
    return sum(consumer.stats.outcomes[outcome] for consumer in consumers)


# ---- bad inputs ---------------------------------------------------------------------------------
def _image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (CRC intact) claims width×height pixels: a decompression bomb."""
    data = bytearray(encode_png(np.zeros((16, 16), dtype=np.uint8)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _job(job_id: str, **fields: object) -> bytes:
    return InspectionJob(job_id=job_id, **fields).model_dump_json().encode()  # type: ignore[arg-type]


def bad_entries(settings: Settings, good: bytes) -> dict[str, tuple[dict[bytes, bytes], DeadReason]]:
    noise = encode_png(np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8))
    bucket = settings.bucket
    return {
        "zero-bytes": ({b"job": _job("bad-zero"), b"image": b""}, DeadReason.EMPTY_IMAGE),
        "truncated-png": (
            {b"job": _job("bad-trunc"), b"image": noise[: len(noise) // 2]},
            DeadReason.UNDECODABLE_IMAGE,
        ),
        "not-an-image": ({b"job": _job("bad-text"), b"image": b"GIF89a, or so it says"}, DeadReason.UNDECODABLE_IMAGE),
        "bomb-20000x20000": (
            {b"job": _job("bad-bomb"), b"image": _png_claiming(20000, 20000)},
            DeadReason.IMAGE_TOO_LARGE,
        ),
        "cmyk-jpeg": (
            {b"job": _job("bad-cmyk"), b"image": _image_bytes(Image.new("CMYK", (64, 64), (0, 50, 100, 0)), "JPEG")},
            DeadReason.UNSUPPORTED_IMAGE_MODE,
        ),
        "float-tiff": (
            {b"job": _job("bad-float"), b"image": _image_bytes(Image.fromarray(np.ones((64, 64), np.float32)), "TIFF")},
            DeadReason.UNSUPPORTED_IMAGE_MODE,
        ),
        "4px-tall": (
            {b"job": _job("bad-tiny"), b"image": encode_png(np.zeros((4, 64), np.uint8))},
            DeadReason.IMAGE_TOO_SMALL,
        ),
        "oversized-inline": (
            {b"job": _job("bad-huge"), b"image": b"\x89PNG" + bytes(MAX_INLINE_IMAGE_BYTES)},
            DeadReason.PAYLOAD_TOO_LARGE,
        ),
        "oversized-envelope": (
            {b"job": json.dumps({"job_id": "bad-envelope", "camera_id": "x" * 20_000}).encode(), b"image": good},
            DeadReason.PAYLOAD_TOO_LARGE,
        ),
        "invalid-json": ({b"job": b'{"job_id": "bad-json", ', b"image": good}, DeadReason.INVALID_JSON),
        # 5 KB of brackets: json.loads raises RecursionError, which once ended the consumer's thread
        "nested-json": ({b"job": b"[" * 5000, b"image": good}, DeadReason.INVALID_JSON),
        # a lone surrogate no text can carry: the dead letter once failed to build, and the entry was retried forever
        "surrogate-job-id": ({b"job": b'{"job_id": "bad\\ud800"}', b"image": good}, DeadReason.INVALID_SCHEMA),
        "no-job-field": ({b"image": good}, DeadReason.INVALID_ENTRY),
        "unknown-field": ({b"job": _job("bad-extra"), b"image": good, b"exec": b"rm -rf /"}, DeadReason.INVALID_ENTRY),
        "missing-job-id": ({b"job": b'{"camera_id": "cam01"}', b"image": good}, DeadReason.INVALID_SCHEMA),
        "path-traversal-job-id": (
            {b"job": json.dumps({"job_id": "../../etc/passwd"}).encode(), b"image": good},
            DeadReason.INVALID_SCHEMA,
        ),
        "path-traversal-ref": (
            {b"job": json.dumps({"job_id": "bad-trav", "image_ref": f"s3://{bucket}/images/../../x"}).encode()},
            DeadReason.INVALID_SCHEMA,
        ),
        "no-image": ({b"job": _job("bad-noimage")}, DeadReason.MISSING_IMAGE),
        "image-and-ref": (
            {b"job": _job("bad-both", image_ref=f"s3://{bucket}/images/a.png"), b"image": good},
            DeadReason.AMBIGUOUS_IMAGE,
        ),
        "missing-object": (
            {b"job": _job("bad-missing", image_ref=f"s3://{bucket}/images/cam01/never-uploaded.png")},
            DeadReason.MISSING_OBJECT,
        ),
    }


def test_each_bad_input_becomes_one_dead_letter_with_its_reason_and_consumer_keeps_going(
    service: Settings, redis_client: redis.Redis, images: list[bytes]
) -> None:
    cases = bad_entries(service, images[0])
    with consuming(service, n=1, max_in_flight=2) as consumers:
        expected: dict[str, tuple[str, DeadReason]] = {}
        good_ids = []
        for i, (case, (fields, reason)) in enumerate(cases.items()):
            entry_id = redis_client.xadd(NAMES.jobs(), fields).decode()
            expected[entry_id] = (case, reason)
            good_ids.append(f"good-{i:02d}")  # a good job after every bad one: the consumer keeps going
            publish_job(redis_client, NAMES, InspectionJob(job_id=good_ids[-1]), image=images[i % len(images)])
        wait_until(lambda: n_answers(redis_client) >= 2 * len(cases), 90, "every entry to be answered")
        time.sleep(0.5)  # anything extra (a second answer) would show up now
    dead = {letter.entry_id: letter for _, letter in read_dead_letters(redis_client, NAMES)}
    got = {entry_id: (expected[entry_id][0], letter.reason) for entry_id, letter in dead.items()}
    assert got == expected
    assert redis_client.xlen(NAMES.dead) == len(cases)
    assert sorted(result.job_id for _, result in read_results(redis_client, NAMES)) == good_ids
    assert redis_client.xpending(NAMES.jobs(), NAMES.scorer_group)["pending"] == 0
    assert total(consumers, Outcome.DEAD) == len(cases)
    assert total(consumers, Outcome.RETRY) == 0


# ---- a scorer replica dies ----------------------------------------------------------------------
def _replicas(deployment: str) -> list[str]:
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and f"#{deployment}#" in actor["name"] and "REPLICA" in actor["name"]
    )


def _sigkill_replica(name: str) -> int:
    actor = ray.get_actor(name, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda replica: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_scorer_replica_killed_mid_run_every_job_still_gets_one_result(
    service: Settings, redis_client: redis.Redis, images: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    scorers, [ingress] = _replicas("PatchScorer"), _replicas("InspectionService")
    assert len(scorers) == 2, scorers
    with consuming(service, n=1, max_in_flight=4, claim_idle_ms=10_000) as consumers:
        job_ids = publish_many(redis_client, images, 120, "replica")
        wait_until(lambda: redis_client.xlen(NAMES.results()) >= 20, 60, "20 results")
        killed = [_sigkill_replica(scorers[0])]
        # then the ingress: the calls it holds fail in the consumer, which retries them
        wait_until(lambda: redis_client.xlen(NAMES.results()) >= 50, 60, "50 results")
        killed.append(_sigkill_replica(ingress))
        wait_until(lambda: n_answers(redis_client) >= len(job_ids), 120, "every job to be answered")
    assert_one_result_each(redis_client, job_ids)
    assert total(consumers, Outcome.RESULT) == len(job_ids)
    assert scorers[0] not in _replicas("PatchScorer")
    assert ingress not in _replicas("InspectionService")
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            pytest.fail(f"replica process {pid} still exists")
    retried = sum("scoring failed" in record.getMessage() for record in caplog.records)
    print(f"replica kills: {len(job_ids)} jobs, {len(job_ids)} results, scoring retries logged: {retried}")
    assert retried >= 1, "the ingress kill failed no call in flight: the consumer's retry was not exercised"


# ---- a consumer process is SIGKILLed ------------------------------------------------------------
def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.5)
        if readable:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:
                pytest.fail(f"consumer process exited with {proc.wait()} before it was ready")
    pytest.fail(f"consumer process not ready after {timeout:g} s")


def _pending_of(client: redis.Redis, consumer: str) -> set[str]:
    rows = client.xpending_range(NAMES.jobs(), NAMES.scorer_group, "-", "+", 1000, consumername=consumer)
    return {row["message_id"].decode() for row in rows}


def test_consumer_sigkilled_mid_run_its_jobs_are_reclaimed_and_answered_once(
    service: Settings, redis_client: redis.Redis, images: list[bytes], ray_cluster: str, tmp_path: Path
) -> None:
    assert service.redis_url is not None and service.s3_access_key is not None and service.s3_secret_key is not None
    env = {
        **os.environ,
        **RAY_ENV,
        "REDIS_URL": service.redis_url.get_secret_value(),
        "S3_ENDPOINT": str(service.s3_endpoint),
        "S3_ACCESS_KEY": service.s3_access_key.get_secret_value(),
        "S3_SECRET_KEY": service.s3_secret_key.get_secret_value(),
        "ANOMAP_BUCKET": service.bucket,
        "RAY_ADDRESS": ray_cluster,
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in ("victim", "survivor"):
            with (tmp_path / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, str(CONSUMER_SCRIPT), name, "2000", "2"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                )
        for proc in procs.values():
            _wait_ready(proc, timeout=120)
        job_ids = publish_many(redis_client, images, 200, "sigkill")
        wait_until(
            lambda: redis_client.xlen(NAMES.results()) >= 30 and len(_pending_of(redis_client, "victim")) > 0,
            90,
            "30 results with jobs in flight at the victim",
        )
        os.kill(procs["victim"].pid, signal.SIGKILL)
        assert procs["victim"].wait(timeout=10) == -signal.SIGKILL
        orphaned = _pending_of(redis_client, "victim")
        wait_until(lambda: n_answers(redis_client) >= len(job_ids), 150, "every job to be answered")
        time.sleep(0.5)
        assert_one_result_each(redis_client, job_ids)
        assert _pending_of(redis_client, "victim") == set()
        procs["survivor"].send_signal(signal.SIGTERM)
        assert procs["survivor"].wait(timeout=60) == 0
        print(f"consumer SIGKILL: {len(job_ids)} jobs, {len(job_ids)} results, {len(orphaned)} reclaimed, 0 dead")
        assert orphaned, "the victim held no entries when it was killed"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


# ---- the object store goes away for 20 s --------------------------------------------------------
def test_object_store_away_for_20_s_jobs_wait_and_then_complete(
    service: Settings,
    redis_client: redis.Redis,
    images: list[bytes],
    s3_server: ManagedServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="anomap")
    max_in_flight = 2
    # 6 s: the keep-alive (about every 1 s) must refresh the waiting entries; a 20 s outage is far longer
    with consuming(service, n=2, max_in_flight=max_in_flight, claim_idle_ms=6000) as consumers:
        job_ids = publish_many(redis_client, images, 60, "s3down")
        wait_until(lambda: redis_client.xlen(NAMES.results()) >= 10, 60, "10 results")
        down_at = time.monotonic()
        s3_server.stop()
        try:  # the store is the whole session's: back up whatever happens here
            before = redis_client.xlen(NAMES.results())
            time.sleep(max(0.0, down_at + 15 - time.monotonic()))
            # the waiting jobs keep their entries: idle time refreshed, no extra delivery counted
            waiting = redis_client.xpending_range(NAMES.jobs(), NAMES.scorer_group, "-", "+", 100)
            time.sleep(max(0.0, down_at + 20 - time.monotonic()))
            during = redis_client.xlen(NAMES.results()) - before
        finally:
            s3_server.restart()
        wait_until(lambda: n_answers(redis_client) >= len(job_ids), 120, "every job to be answered")
    assert during <= 2 * max_in_flight  # at most the jobs whose maps were written before the outage
    assert waiting, "no job was waiting for the store"
    assert all(row["time_since_delivered"] < 6000 and row["times_delivered"] == 1 for row in waiting), waiting
    assert_one_result_each(redis_client, job_ids)
    # the outage was waited out in the jobs' threads: no entry was left pending, none taken over
    assert total(consumers, Outcome.RETRY) == 0
    assert total(consumers, Outcome.DUPLICATE) == 0
    assert any("writing maps/" in record.getMessage() for record in caplog.records), "no store write was retried"
    store = object_store(service)
    assert all(store.exists(result.map_ref.split("/", 3)[3]) for _, result in read_results(redis_client, NAMES))


# ---- Redis restarts -----------------------------------------------------------------------------
def test_redis_killed_and_restarted_mid_run_loses_no_job(
    service: Settings, redis_client: redis.Redis, images: list[bytes], valkey_server: ManagedServer
) -> None:
    # Acknowledged writes must survive the kill: fsync before each reply (the restart resets it).
    redis_client.config_set("appendfsync", "always")
    with consuming(service, n=2, max_in_flight=2, claim_idle_ms=5000) as consumers:
        job_ids = publish_many(redis_client, images, 120, "redis")
        wait_until(lambda: redis_client.xlen(NAMES.results()) >= 25, 60, "25 results")
        valkey_server.kill()
        try:
            time.sleep(2)
        finally:  # the server is the whole session's
            valkey_server.restart()
        wait_until(lambda: n_answers(redis_client) >= len(job_ids), 120, "every job to be answered")
        time.sleep(0.5)
    assert_one_result_each(redis_client, job_ids)
    assert total(consumers, Outcome.RETRY) == 0


# ---- an entry gets one answer even when two consumers disagree ----------------------------------
def test_entry_dead_lettered_by_one_consumer_gets_no_result_from_another(
    service: Settings, redis_client: redis.Redis, images: list[bytes]
) -> None:
    config = ConsumerConfig(consumer="slow", max_deliveries=2)
    consumer = StreamConsumer(redis_client, object_store(service), ServeInspector.connect(60), NAMES, config)
    consumer.ensure_groups()
    entry = publish_job(redis_client, NAMES, InspectionJob(job_id="race-0001"), image=images[0])
    [(_, [(_, fields)])] = redis_client.xreadgroup(NAMES.scorer_group, "slow", {NAMES.jobs(): ">"}, count=1)
    # another consumer reclaimed it once too often and dead-lettered it while this one was scoring
    assert consumer.process_entry(NAMES.jobs(), entry, fields, deliveries=3) is Outcome.DEAD
    assert consumer.process_entry(NAMES.jobs(), entry, fields, deliveries=1) is Outcome.DUPLICATE
    assert redis_client.xlen(NAMES.results()) == 0
    [(_, letter)] = list(read_dead_letters(redis_client, NAMES))
    assert (letter.job_id, letter.reason) == ("race-0001", DeadReason.TOO_MANY_DELIVERIES)
