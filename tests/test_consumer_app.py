"""The Serve config's applications, built by their app builders from deploy/serve.yaml's args, run
the whole service on a local Ray: the consumer app reads published jobs and scores them through
the anomap app; ``anomap status`` then sees both applications and the consumers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from helpers import register_small_model, small_png

from cluster.status import StatusOptions, gather_status
from schemas import InspectionJob, Settings, StreamNames
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from workers.publisher import publish_job
from workers.results import read_results

pytestmark = pytest.mark.ray
SERVE_YAML = Path(__file__).resolve().parent.parent / "deploy" / "serve.yaml"


@pytest.fixture
def service_from_serve_yaml(
    stack_settings: Settings, ray_cluster: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Settings, str]]:
    from ray import serve

    from workers.consumer_app import CONSUMER_APP_NAME
    from workers.consumer_app import app_builder as consumers_builder
    from workers.serve_app import APP_NAME
    from workers.serve_app import app_builder as scoring_builder

    settings = stack_settings.model_copy(update={"bucket": f"capp-{uuid.uuid4().hex[:8]}"})
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    card = register_small_model(store, settings.model_name)
    ModelRegistry(store, settings.model_name).set_live(card.version)
    assert settings.redis_url and settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key
    for name, value in {
        "REDIS_URL": settings.redis_url.get_secret_value(),
        "S3_ENDPOINT": settings.s3_endpoint,
        "S3_ACCESS_KEY": settings.s3_access_key.get_secret_value(),
        "S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
        "ANOMAP_BUCKET": settings.bucket,
    }.items():
        monkeypatch.setenv(name, value)
    apps = {app["name"]: app for app in yaml.safe_load(SERVE_YAML.read_text())["applications"]}
    serve.start(proxy_location="Disabled")
    serve.run(scoring_builder(apps[APP_NAME]["args"]), name=APP_NAME, route_prefix=None)
    serve.run(consumers_builder(apps[CONSUMER_APP_NAME]["args"]), name=CONSUMER_APP_NAME, route_prefix=None)
    try:
        yield settings, card.version
    finally:
        serve.delete(CONSUMER_APP_NAME)
        serve.delete(APP_NAME)


def test_consumer_app_scores_published_jobs_and_status_sees_the_service(
    service_from_serve_yaml: tuple[Settings, str], ray_cluster: str, redis_client: redis.Redis
) -> None:
    settings, version = service_from_serve_yaml
    names = StreamNames(settings.stream_prefix)
    for i in range(3):
        publish_job(redis_client, names, InspectionJob(job_id=f"capp-{i}", camera_id="cam01"), image=small_png(i))
    deadline = time.monotonic() + 120
    while redis_client.xlen(names.results()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    results = [result for _, result in read_results(redis_client, names)]
    assert sorted(r.job_id for r in results) == ["capp-0", "capp-1", "capp-2"]
    assert {r.model_version for r in results} == {version}

    status = gather_status(settings.model_copy(update={"ray_address": ray_cluster}), StatusOptions())
    apps = status["serve"]["applications"]
    assert apps["anomap"]["status"] == "RUNNING" and apps["anomap-consumers"]["status"] == "RUNNING"
    assert apps["anomap"]["deployments"]["PatchScorer"]["replicas"] == {"RUNNING": 2}
    jobs = status["streams"][names.jobs()]
    assert (jobs["length"], jobs["lag"], jobs["pending"]) == (3, 0, 0)
    assert len(jobs["groups"][0]["consumers"]) == 2  # consumers_per_replica in serve.yaml
    assert status["results"]["count"] == 3
    assert status["model"]["live"]["default"] == version
