"""Hot swap and per-line models through real servers: one Serve app that follows the registry's live pointers.

A steady stream of jobs on two lines runs while the live pointers move; every job must end with exactly
one result and no dead letter, each result naming the version that scored it, and the new version must
take over within seconds.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import pytest
import redis
from helpers import SIZE, SMALL_CONFIG, small_png

from cluster.serving import InspectionServer
from schemas import InspectionJob, ModelCard, Settings, StreamNames
from trainer.pipeline import initial_model_version
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from trainer.synthetic import synth_image
from workers.live_models import DEFAULT_REFRESH_S
from workers.publisher import publish_job
from workers.results import read_dead_letters, read_results

pytestmark = pytest.mark.ray

LINES = ("default", "press-2")


@pytest.fixture(scope="module")
def swap_service(stack_settings: Settings, ray_cluster: object) -> Iterator[tuple[Settings, ModelRegistry]]:
    settings = stack_settings.model_copy(
        update={"bucket": f"swap-{uuid.uuid4().hex[:8]}", "stream_prefix": f"swap{uuid.uuid4().hex[:6]}"}
    )
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    yield settings, ModelRegistry(store, settings.model_name)


def _version(registry: ModelRegistry, seed: int) -> ModelCard:
    """A small model version with its own weights (untrained networks of seed ``seed``)."""
    import numpy as np

    images = [synth_image(s, SIZE)[0].astype(np.float32) / 255 for s in range(3)]
    return initial_model_version(registry, SMALL_CONFIG.replace(seed=seed), images, data_digest=f"swap-{seed}")


def _publish_steadily(
    client: redis.Redis, names: StreamNames, stop: threading.Event, period_s: float, sent: list[InspectionJob]
) -> None:
    png = small_png(3)
    i = 0
    while not stop.is_set():
        line = LINES[i % len(LINES)]
        job = InspectionJob(job_id=f"swap-{i:05d}", camera_id="cam01", line=line)
        publish_job(client, names, job, image=png)
        sent.append(job)
        i += 1
        time.sleep(period_s)


def _results_by_job(client: redis.Redis, names: StreamNames) -> dict[str, list[tuple[str, datetime, datetime]]]:
    """job id -> [(model version, published at, scored at)] over every line's results."""
    found: dict[str, list[tuple[str, datetime, datetime]]] = {}
    for line in LINES:
        for _, result in read_results(client, names, line):
            found.setdefault(result.job_id, []).append((result.model_version, result.published_at, result.scored_at))
    return found


SLACK_S = 5.0
"""Beyond the refresh period, for a registry read slowed down by a loaded 2-core machine."""


def test_promotion_swaps_models_under_load_without_failing_a_job(
    swap_service: tuple[Settings, ModelRegistry], redis_client: redis.Redis
) -> None:
    settings, registry = swap_service
    names = StreamNames(settings.stream_prefix)
    old, new, other = _version(registry, 0), _version(registry, 1), _version(registry, 2)
    registry.set_live(old.version)
    registry.set_live(other.version, line="press-2")  # press-2 has its own model from the start
    sent: list[InspectionJob] = []
    stop = threading.Event()
    with InspectionServer(settings, None, consumers=2, lines=LINES, scorer_replicas=2, max_in_flight=2):
        publisher = threading.Thread(target=_publish_steadily, args=(redis_client, names, stop, 0.1, sent))
        publisher.start()
        time.sleep(4.0)
        promoted_at = datetime.now().astimezone()
        registry.set_live(new.version)  # the default line only; press-2 keeps its own pointer
        time.sleep(2 * DEFAULT_REFRESH_S + SLACK_S + 2.0)
        stop.set()
        publisher.join()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(_results_by_job(redis_client, names)) < len(sent):
            time.sleep(0.2)
    results = _results_by_job(redis_client, names)
    assert list(read_dead_letters(redis_client, names)) == []
    assert len(sent) > 60
    assert sorted(results) == sorted(job.job_id for job in sent), "every job has a result"
    assert all(len(scored) == 1 for scored in results.values()), "no job has two results"
    by_line = {line: [results[j.job_id][0] for j in sent if j.line == line] for line in LINES}
    assert {version for version, *_ in by_line["press-2"]} == {other.version}
    default = by_line["default"]
    versions = Counter(version for version, *_ in default)
    assert set(versions) == {old.version, new.version}, versions
    # Scored before the promotion: the old version; published refresh_s (+ slack) after it: the new one.
    # (A job waiting in the stream when the pointer moves is scored by the new version: it is resolved per image.)
    assert all(version == old.version for version, _, scored in default if scored < promoted_at)
    settled = promoted_at.timestamp() + DEFAULT_REFRESH_S + SLACK_S
    late = [version for version, published, _ in default if published.timestamp() > settled]
    assert late, "jobs were published after the swap settled"
    assert set(late) == {new.version}
    # The switch is monotonic: once a job was scored by the new version, later jobs never go back.
    first_new = next(i for i, (version, *_) in enumerate(default) if version == new.version)
    assert all(version == new.version for version, *_ in default[first_new + 4 :])


def test_pinned_app_ignores_promotions(swap_service: tuple[Settings, ModelRegistry], redis_client: redis.Redis) -> None:
    settings, registry = swap_service
    names = StreamNames(settings.stream_prefix + "pin")
    settings = settings.model_copy(update={"stream_prefix": names.prefix})
    pinned, newer = _version(registry, 3), _version(registry, 4)
    registry.set_live(pinned.version)
    with InspectionServer(settings, pinned.version, consumers=1, scorer_replicas=1):
        registry.set_live(newer.version)
        time.sleep(DEFAULT_REFRESH_S + 1.0)
        for i in range(3):
            publish_job(redis_client, names, InspectionJob(job_id=f"pin-{i}", camera_id="cam01"), image=small_png(i))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and redis_client.xlen(names.results()) < 3:
            time.sleep(0.1)
    assert [r.model_version for _, r in read_results(redis_client, names)] == [pinned.version] * 3
