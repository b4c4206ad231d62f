"""End to end through real servers: Valkey streams → consumer → Ray Serve → SeaweedFS → results.

One small model version (untrained networks, calibrated on synthetic metal) is deployed once for
this module; each test publishes jobs and checks what comes out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers import SIZE, point_cli_at, small_png, small_service
from ray import serve

from cluster.demo import DemoOptions, DemoRefused, run_demo
from schemas import (
    DeadReason,
    InspectionJob,
    ModelCard,
    Settings,
    StreamNames,
)
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind
from workers.consumer import ConsumerConfig, Outcome, StreamConsumer
from workers.inspection import ScoredImage
from workers.maps import decode_map
from workers.publisher import image_key, publish_job, upload_image
from workers.results import read_dead_letters, read_results
from workers.scored_images import scored_image_key
from workers.serve_app import ServeInspector

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def service(stack_settings: Settings, ray_cluster: object) -> Iterator[tuple[Settings, ModelCard]]:
    with small_service(stack_settings, "e2e", scorer_replicas=2) as deployed:
        yield deployed


@pytest.fixture
def consumer(service: tuple[Settings, ModelCard], redis_client: redis.Redis) -> Iterator[StreamConsumer]:
    settings, _ = service
    consumer = StreamConsumer(
        redis_client,
        ObjectStore.from_settings(settings),
        ServeInspector.connect(timeout_s=60),
        StreamNames(settings.stream_prefix),
        ConsumerConfig(consumer="test-consumer", max_in_flight=2, block_ms=100, claim_idle_ms=60_000),
    )
    consumer.ensure_groups()
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    yield consumer
    stop.set()
    thread.join(timeout=60)
    assert not thread.is_alive()


def _wait_for(client: redis.Redis, names: StreamNames, n_results: int, n_dead: int = 0, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.xlen(names.results()) >= n_results and client.xlen(names.dead) >= n_dead:
            return
        time.sleep(0.1)
    pytest.fail(f"timed out: {client.xlen(names.results())} results, {client.xlen(names.dead)} dead letters")


def test_published_job_comes_back_as_result_with_map_in_store(
    service: tuple[Settings, ModelCard], consumer: StreamConsumer, redis_client: redis.Redis
) -> None:
    settings, card = service
    names = StreamNames(settings.stream_prefix)
    job = InspectionJob(job_id="cam01-000001", camera_id="cam01")
    png = small_png(1, (DefectKind.SCRATCH,))
    publish_job(redis_client, names, job, image=png)
    _wait_for(redis_client, names, 1)
    [(_, result)] = list(read_results(redis_client, names))
    assert result.job_id == job.job_id
    assert result.model_version == card.version
    assert (result.width, result.height) == (SIZE, SIZE)
    store = ObjectStore.from_settings(settings)
    stored = decode_map(store.get_bytes(result.map_ref.split("/", 3)[3]))
    assert stored.shape == (SIZE, SIZE)
    assert store.get_bytes(result.overlay_ref.split("/", 3)[3]).startswith(b"\xff\xd8\xff")  # JPEG
    assert result.raw_image_score == pytest.approx(float(stored.max()), rel=2.0**-11)  # the map is stored as float16
    assert store.get_bytes(scored_image_key("default", job.job_id)) == png, "the job's image is kept for confirmations"
    assert redis_client.xpending(names.jobs(), names.scorer_group)["pending"] == 0


def test_undecodable_image_becomes_dead_letter_and_consumer_keeps_going(
    service: tuple[Settings, ModelCard], consumer: StreamConsumer, redis_client: redis.Redis
) -> None:
    settings, _ = service
    names = StreamNames(settings.stream_prefix)
    publish_job(redis_client, names, InspectionJob(job_id="cam02-bad"), image=b"this is not an image")
    publish_job(redis_client, names, InspectionJob(job_id="cam02-truncated"), image=small_png(2)[:300])
    publish_job(redis_client, names, InspectionJob(job_id="cam02-good"), image=small_png(3))
    _wait_for(redis_client, names, n_results=1, n_dead=2)
    dead = {letter.job_id: letter for _, letter in read_dead_letters(redis_client, names)}
    assert dead["cam02-bad"].reason is DeadReason.UNDECODABLE_IMAGE
    assert dead["cam02-truncated"].reason is DeadReason.UNDECODABLE_IMAGE
    assert [r.job_id for _, r in read_results(redis_client, names)] == ["cam02-good"]
    assert redis_client.xpending(names.jobs(), names.scorer_group)["pending"] == 0


def test_job_by_reference_is_scored_and_missing_reference_is_dead_lettered(
    service: tuple[Settings, ModelCard], consumer: StreamConsumer, redis_client: redis.Redis
) -> None:
    settings, _ = service
    names = StreamNames(settings.stream_prefix)
    store = ObjectStore.from_settings(settings)
    job = InspectionJob(job_id="cam03-ref", camera_id="cam03")
    ref = upload_image(store, image_key(job), small_png(4))
    publish_job(redis_client, names, job.model_copy(update={"image_ref": ref}))
    missing = InspectionJob(job_id="cam03-missing", image_ref=f"s3://{settings.bucket}/images/nope.png")
    publish_job(redis_client, names, missing)
    _wait_for(redis_client, names, n_results=1, n_dead=1)
    [(_, letter)] = list(read_dead_letters(redis_client, names))
    assert (letter.job_id, letter.reason) == ("cam03-missing", DeadReason.MISSING_OBJECT)


def test_redelivered_job_is_not_scored_twice(service: tuple[Settings, ModelCard], redis_client: redis.Redis) -> None:
    settings, _ = service
    names = StreamNames(settings.stream_prefix)
    serve_inspector = ServeInspector.connect(timeout_s=60)
    calls: list[str] = []

    def counted(image: np.ndarray, pixel_threshold: float | None = None, line: str = "default") -> ScoredImage:
        calls.append(line)
        return serve_inspector(image, pixel_threshold, line)

    consumer = StreamConsumer(
        redis_client, ObjectStore.from_settings(settings), counted, names, ConsumerConfig(consumer="redelivery")
    )
    consumer.ensure_groups()
    entry = publish_job(redis_client, names, InspectionJob(job_id="cam04-once"), image=small_png(5))
    [(_, items)] = redis_client.xreadgroup(names.scorer_group, "redelivery", {names.jobs(): ">"}, count=1)
    fields = items[0][1]
    assert consumer.process_entry(names.jobs(), entry, fields, deliveries=1) is Outcome.RESULT
    # the same entry delivered again (a consumer crashed after writing, say): acknowledged, not rescored
    assert consumer.process_entry(names.jobs(), entry, fields, deliveries=2) is Outcome.DUPLICATE
    assert redis_client.xlen(names.results()) == 1
    assert len(calls) == 1  # the done marker turned it away before Serve saw it again
    # the same job id on a different entry is a dead letter, not a silent drop
    other = publish_job(redis_client, names, InspectionJob(job_id="cam04-once"), image=small_png(5))
    assert consumer.process_entry(names.jobs(), other, fields, deliveries=1) is Outcome.DEAD
    [(_, letter)] = list(read_dead_letters(redis_client, names))
    assert letter.reason is DeadReason.DUPLICATE_JOB


def test_the_demo_refuses_to_take_over_a_running_service(
    service: tuple[Settings, ModelCard], ray_cluster: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`anomap demo` pointed at servers it did not start, with a Serve app running there: it stops before
    training, and the running app and the registry's pointers are as they were."""
    settings, card = service
    point_cli_at(monkeypatch, settings, settings.bucket, tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    registry = ModelRegistry(ObjectStore.from_settings(settings), settings.model_name)
    pointers = registry.live_pointers()
    with pytest.raises(DemoRefused, match="the demo would replace the 'anomap' app"):
        run_demo(DemoOptions(jobs=4, image_size=64, report_dir=tmp_path / "report"))
    assert "anomap" in serve.status().applications
    assert registry.live_pointers() == pointers and registry.versions() == [card.version]
