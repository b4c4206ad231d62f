"""The service's metrics reach Ray's metrics endpoint, and its log records about a job carry the job.

Jobs go through a real consumer, the Serve app and real Valkey/SeaweedFS on a line of their own
(``metrics``), so the counters of other tests' jobs do not mix in; then Ray's Prometheus endpoint
is scraped until the consumer's and the replicas' reports have arrived.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from helpers import small_png, small_service
from prometheus_client.parser import text_string_to_metric_families

from cluster.connections import LocalRay
from schemas import DeadReason, InspectionJob, ModelCard, Settings, StreamNames
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind
from workers.consumer import ConsumerConfig, StreamConsumer
from workers.publisher import publish_job
from workers.serve_app import ServeInspector

pytestmark = pytest.mark.ray

LINE = "metrics"
GOOD_JOBS = 3


@dataclass(frozen=True)
class Sample:
    """One line of the Prometheus text: a series and its value."""

    name: str
    labels: dict[str, str]
    value: float


def scrape(url: str) -> list[Sample]:
    """Every sample on a Prometheus endpoint (empty while it does not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return []
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum over the series of ``name`` whose labels include ``labels``; None when there is none."""
    values = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(values) if values else None


@pytest.fixture(scope="module")
def service(stack_settings: Settings, ray_cluster: str) -> Iterator[tuple[Settings, ModelCard]]:
    with small_service(stack_settings, "tel", scorer_replicas=1) as deployed:
        yield deployed


def test_jobs_results_dead_letters_and_latencies_appear_on_rays_metrics_endpoint(
    service: tuple[Settings, ModelCard],
    redis_client: redis.Redis,
    local_ray: LocalRay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="anomap")
    settings, card = service
    names = StreamNames(settings.stream_prefix)
    consumer = StreamConsumer(
        redis_client,
        ObjectStore.from_settings(settings),
        ServeInspector.connect(timeout_s=60),
        names,
        ConsumerConfig(consumer="metrics-consumer", lines=(LINE,), block_ms=100, backlog_every_s=0.5),
    )
    consumer.ensure_groups()
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for n in range(GOOD_JOBS):
            job = InspectionJob(job_id=f"metrics-{n}", line=LINE)
            publish_job(redis_client, names, job, image=small_png(n, (DefectKind.SCRATCH,)))
        publish_job(redis_client, names, InspectionJob(job_id="metrics-bad", line=LINE), image=b"not an image")
        deadline = time.monotonic() + 60
        while redis_client.xlen(names.results(LINE)) < GOOD_JOBS or redis_client.xlen(names.dead) < 1:
            assert time.monotonic() < deadline, "the jobs were not answered within 60 s"
            time.sleep(0.1)

        wanted = {
            "ray_anomap_jobs_total": ({"line": LINE}, GOOD_JOBS + 1),
            "ray_anomap_results_total": ({"line": LINE}, GOOD_JOBS),
            "ray_anomap_dead_letters_total": ({"line": LINE, "reason": DeadReason.UNDECODABLE_IMAGE.value}, 1),
            "ray_anomap_latency_seconds_count": ({"line": LINE}, GOOD_JOBS),
            "ray_anomap_stage_seconds_count": ({"line": LINE, "stage": "score"}, GOOD_JOBS),
            "ray_anomap_stream_lag": ({"line": LINE}, 0),
            "ray_anomap_stream_pending": ({"line": LINE}, 0),
        }
        deadline = time.monotonic() + 30
        while True:
            samples = scrape(local_ray.metrics_url)
            seen = {name: total(samples, name, **labels) for name, (labels, _) in wanted.items()}
            seen["ray_anomap_patch_batch_size_count"] = total(samples, "ray_anomap_patch_batch_size_count")
            seen["ray_anomap_model_info"] = total(
                samples, "ray_anomap_model_info", model_version=card.version, deployment="InspectionService"
            )
            if all(seen[name] == value for name, (_, value) in wanted.items()) and all(
                seen[name] for name in ("ray_anomap_patch_batch_size_count", "ray_anomap_model_info")
            ):
                break
            assert time.monotonic() < deadline, f"metrics not on {local_ray.metrics_url} after 30 s: {seen}"
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=60)

    latency_sum = total(samples, "ray_anomap_latency_seconds_sum", line=LINE)
    assert latency_sum is not None and 0 < latency_sum < 60 * GOOD_JOBS
    assert total(samples, "ray_anomap_latency_seconds_bucket", line=LINE, le="+Inf") == GOOD_JOBS
    for stage in ("decode", "write_map", "write_result"):
        assert total(samples, "ray_anomap_stage_seconds_count", line=LINE, stage=stage) == GOOD_JOBS, stage
    patches = total(samples, "ray_anomap_patch_batch_size_sum")
    assert patches is not None and patches > 0

    [dead] = [r for r in caplog.records if "dead letter" in r.getMessage()]
    assert (getattr(dead, "job_id", None), getattr(dead, "line", None)) == ("metrics-bad", LINE)
    assert getattr(dead, "entry_id", None)
