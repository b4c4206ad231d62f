"""``anomap status``: against a real Valkey and object store, the JSON names every stream's length,
lag and pending count, the consumers, dead letters by reason, recent results and the live model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from helpers import a_result, register_small_model
from pydantic import SecretStr
from typer.testing import CliRunner

from cluster.cli import app
from cluster.status import (
    StatusOptions,
    classify_stream,
    estimated_window_count,
    gather_status,
    recent_results,
    summarize_serve,
)
from cluster.status_view import render_status
from schemas import DeadLetter, DeadReason, InspectionJob, InspectionResult, Settings, StreamNames
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from workers.publisher import publish_job

runner = CliRunner()
NAMES = StreamNames()


def _result(job_id: str, latency_ms: float, version: str) -> InspectionResult:
    return a_result(job_id, latency_ms=latency_ms, version=version)


def _dead(entry_id: str, reason: DeadReason) -> bytes:
    letter = DeadLetter(
        entry_id=entry_id, stream=NAMES.jobs(), job_id=None, reason=reason, detail="x", delivery_count=1
    )
    return letter.model_dump_json().encode()


@pytest.fixture
def busy_stack(redis_client: redis.Redis, object_store: ObjectStore, stack_settings: Settings) -> tuple[Settings, str]:
    """A stack mid-flight: jobs read but not acknowledged, a second line, results, dead letters, a live model."""
    settings = stack_settings.model_copy(update={"bucket": object_store.bucket})
    card = register_small_model(object_store, settings.model_name)
    ModelRegistry(object_store, settings.model_name).set_live(card.version)
    for i in range(3):
        publish_job(redis_client, NAMES, InspectionJob(job_id=f"cam01-{i}", camera_id="cam01"), image=b"png")
    publish_job(redis_client, NAMES, InspectionJob(job_id="cam02-0", camera_id="cam02", line="line2"), image=b"png")
    for stream in (NAMES.jobs(), NAMES.jobs("line2")):
        redis_client.xgroup_create(stream, NAMES.scorer_group, id="0")
    # a line no consumer serves yet: no group on its stream, and its job waits all the same
    publish_job(redis_client, NAMES, InspectionJob(job_id="cam03-0", camera_id="cam03", line="line3"), image=b"png")
    redis_client.xreadgroup(NAMES.scorer_group, "worker-a", {NAMES.jobs(): ">"}, count=2)  # 2 pending, 1 lag
    for i, latency in enumerate((100.0, 200.0, 300.0)):
        result = _result(f"done-{i}", latency, card.version)
        redis_client.xadd(NAMES.results(), {"result": result.model_dump_json()})
    for i, reason in enumerate((DeadReason.UNDECODABLE_IMAGE, DeadReason.UNDECODABLE_IMAGE, DeadReason.MISSING_OBJECT)):
        redis_client.xadd(NAMES.dead, {"dead": _dead(f"1-{i}", reason)})
    return settings, card.version


def _env(monkeypatch: pytest.MonkeyPatch, settings: Settings, tmp_path: Path) -> None:
    assert settings.redis_url and settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key
    monkeypatch.setenv("REDIS_URL", settings.redis_url.get_secret_value())
    monkeypatch.setenv("S3_ENDPOINT", settings.s3_endpoint)
    monkeypatch.setenv("S3_ACCESS_KEY", settings.s3_access_key.get_secret_value())
    monkeypatch.setenv("S3_SECRET_KEY", settings.s3_secret_key.get_secret_value())
    monkeypatch.setenv("ANOMAP_BUCKET", settings.bucket)
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("ANOMAP_STREAM_PREFIX", raising=False)
    monkeypatch.delenv("ANOMAP_MODEL_NAME", raising=False)


def test_a_burst_that_ended_is_not_credited_to_the_whole_window(redis_client: redis.Redis) -> None:
    """6000 results at 200/s that stopped 30 s ago, read through a 5000-entry sample: ~6000 in the last
    minute (100/s), not the 12 000 (200/s) the sample's own span implies; anomalous scaled alike."""
    now_ms = int(time.time() * 1000)
    stream = NAMES.results("burst")
    pipe = redis_client.pipeline(transaction=False)
    for i in range(6000):  # one every 5 ms from 60 s ago to 30 s ago; every other one anomalous
        fields = {"result": json.dumps({"latency_ms": 1.0, "model_version": "v1", "is_anomalous": i % 2 == 0})}
        pipe.xadd(stream, fields, id=f"{now_ms - 59_999 + 5 * i}-0")
    pipe.execute()
    summary, _ = recent_results(redis_client, stream, now_ms, window_s=60, sample=5000)
    assert summary["estimated"] is True and summary["sampled"] == 5000
    assert 0.85 * 6000 <= summary["count"] <= 1.1 * 6000, summary["count"]
    assert summary["per_s"] == pytest.approx(summary["count"] / 60)
    assert summary["anomalous"] == pytest.approx(summary["count"] / 2, rel=0.01)


def _scan_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_streams_come_from_the_line_set_without_scanning_the_markers(
    redis_client: redis.Redis, stack_settings: Settings
) -> None:
    """10 000 done markers stand in for a week of jobs: status reads the lines publish_job recorded and
    never SCANs them; --scan still finds a line only another publisher writes to."""
    pipe = redis_client.pipeline(transaction=False)
    for i in range(10_000):
        pipe.set(NAMES.done_marker(f"job-{i}"), "1-0")
    pipe.execute()
    publish_job(redis_client, NAMES, InspectionJob(job_id="j1", camera_id="cam01", line="press-2"), image=b"x")
    redis_client.xadd(NAMES.jobs("foreign"), {"job": b"{}"})  # not through publish_job, no consumer
    before = _scan_calls(redis_client)
    status = gather_status(stack_settings, StatusOptions(serve=False))
    assert _scan_calls(redis_client) == before
    assert NAMES.jobs("press-2") in status["streams"] and NAMES.results("press-2") in status["streams"]
    assert NAMES.jobs("foreign") not in status["streams"]
    scanned = gather_status(stack_settings, StatusOptions(serve=False, scan=True))
    assert NAMES.jobs("foreign") in scanned["streams"] and _scan_calls(redis_client) > before


def test_window_count_estimate() -> None:
    assert estimated_window_count(5000, oldest_sampled_ms=50_000, now_ms=60_000, window_ms=60_000) == 30_000  # steady
    assert estimated_window_count(5000, oldest_sampled_ms=0, now_ms=60_000, window_ms=60_000) == 5000  # all of it
    assert estimated_window_count(10, oldest_sampled_ms=60_000, now_ms=60_000, window_ms=60_000) == 600_000


def test_status_json_has_every_streams_length_lag_pending_dead_letters_and_live_model(
    busy_stack: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, version = busy_stack
    _env(monkeypatch, settings, tmp_path)
    outcome = runner.invoke(app, ["status", "--json"])
    assert outcome.exit_code == 0, outcome.output
    status = json.loads(outcome.stdout)

    streams = status["streams"]
    expected = {NAMES.jobs(), NAMES.jobs("line2"), NAMES.results(), NAMES.dead, NAMES.confirmations, NAMES.models}
    assert set(streams) >= expected
    for name in expected:
        assert {"length", "lag", "pending", "exists", "groups"} <= set(streams[name]), name
    jobs = streams[NAMES.jobs()]
    assert (jobs["kind"], jobs["line"], jobs["length"], jobs["lag"], jobs["pending"]) == ("jobs", "default", 3, 1, 2)
    [group] = jobs["groups"]
    [consumer] = group["consumers"]
    assert (group["name"], consumer["name"], consumer["pending"]) == ("scorers", "worker-a", 2)
    assert consumer["idle_ms"] >= 0
    line2 = streams[NAMES.jobs("line2")]
    assert (line2["line"], line2["length"], line2["lag"], line2["pending"], line2["groups"][0]["consumers"]) == (
        "line2",
        1,
        1,
        0,
        [],
    )
    line3 = streams[NAMES.jobs("line3")]
    assert (line3["length"], line3["lag"], line3["groups"]) == (1, 1, [])  # unread, not unknown
    assert status["jobs"] == {"streams": 3, "length": 5, "lag": 3, "pending": 2, "consumers": 1}
    assert (streams[NAMES.results()]["length"], streams[NAMES.results()]["lag"]) == (3, None)  # no group reads it
    assert (streams[NAMES.confirmations]["exists"], streams[NAMES.confirmations]["length"]) == (False, 0)

    assert status["dead_letters"]["total"] == 3
    assert status["dead_letters"]["by_reason"] == {"undecodable_image": 2, "missing_object": 1}

    results = status["results"]
    assert (results["count"], results["estimated"]) == (3, False)
    assert results["per_s"] == pytest.approx(3 / 60)
    assert results["latency_ms"]["p50"] == pytest.approx(200.0)
    assert results["model_versions"] == {version: 3}

    assert status["model"]["live"]["default"] == version
    assert status["model"]["live"]["line2"] == version  # no pointer of its own: the default one
    assert status["serve"]["available"] is False and "RAY_ADDRESS" in status["serve"]["reason"]
    assert status["redis"]["ok"] is True


def test_status_table_shows_streams_dead_letters_and_model(
    busy_stack: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, version = busy_stack
    _env(monkeypatch, settings, tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    outcome = runner.invoke(app, ["status"])
    assert outcome.exit_code == 0, outcome.output
    for text in ("anomap:jobs:line2", "worker-a", "undecodable_image", version, "serve: not shown", "anomap dead list"):
        assert text in outcome.output


def test_status_says_when_redis_does_not_answer(tmp_path: Path) -> None:
    settings = Settings(redis_url=SecretStr("redis://:secret@127.0.0.1:1/0"), state_dir=tmp_path)
    status = gather_status(settings, StatusOptions(serve=False))
    assert status["redis"]["ok"] is False and "error" in status["redis"]
    assert "secret" not in json.dumps(status)
    assert status["streams"] == {} and status["jobs"]["length"] == 0
    render_status(status)  # renders without the stream tables


def test_streams_are_classified_by_kind_and_line() -> None:
    assert classify_stream("anomap:jobs", NAMES) == ("jobs", "default")
    assert classify_stream("anomap:jobs:press-3", NAMES) == ("jobs", "press-3")
    assert classify_stream("anomap:results:press-3", NAMES) == ("results", "press-3")
    assert classify_stream("anomap:dead", NAMES) == ("dead", None)
    assert classify_stream("anomap:jobsx", NAMES) == ("other", None)


def test_serve_status_becomes_json_with_replicas_by_state() -> None:
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
    from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

    deployment = DeploymentStatusOverview(
        status=DeploymentStatus.HEALTHY,
        status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
        replica_states={ReplicaState.RUNNING: 2},
        message="",
    )
    overview = ApplicationStatusOverview(
        status=ApplicationStatus.RUNNING,
        message="",
        last_deployed_time_s=0.0,
        deployments={"PatchScorer": deployment},
    )
    summary = summarize_serve(ServeStatus(applications={"anomap": overview}))
    assert summary == {
        "available": True,
        "applications": {
            "anomap": {
                "status": "RUNNING",
                "message": "",
                "deployments": {"PatchScorer": {"status": "HEALTHY", "replicas": {"RUNNING": 2}, "message": ""}},
            }
        },
    }
    json.dumps(summary)
    render_status(
        {
            "time": "t",
            "redis": {"url": None, "ok": False},
            "model": {"name": "metal", "live": {}},
            "jobs": {"streams": 0, "length": 0, "lag": None, "pending": 0, "consumers": 0},
            "serve": summary,
        }
    )
