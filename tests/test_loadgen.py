"""The open-loop load generator: its schedule and summary (pure), and its bookkeeping on real Valkey/S3.

The server tests answer jobs with a stand-in thread that writes minimal results: they pin what
loadgen counts and times, not the scorer.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from cluster.cli import app
from schemas import InspectionJob, InspectionResult, Settings, StreamNames, decode_job_entry, parse_s3_ref
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind
from workers.loadgen import (
    LoadGenerator,
    LoadProgress,
    LoadSummary,
    camera_images,
    defect_plan,
    done_waiting,
    due_order,
    job_id,
    percentile,
    progress_line,
    publish_schedule,
)
from workers.publisher import publish_job

NAMES = StreamNames()


def test_schedule_has_one_due_time_per_frame_evenly_spaced_and_staggered_across_cameras() -> None:
    schedule = publish_schedule(cameras=4, fps=5.0, duration_s=3.0)
    assert [len(times) for times in schedule] == [15] * 4  # N·F·S = 60 in all
    for camera, times in enumerate(schedule):
        assert times[0] == pytest.approx(camera * 0.2 / 4)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps == pytest.approx([0.2] * 14)
        assert all(0 <= t < 3.0 for t in times)
    assert len({times[0] for times in schedule}) == 4


def test_schedule_rounds_down_to_whole_frames_and_rejects_nonsense() -> None:
    assert [len(t) for t in publish_schedule(cameras=2, fps=0.5, duration_s=5.0)] == [2, 2]
    with pytest.raises(ValueError, match="cameras must be >= 1"):
        publish_schedule(cameras=0, fps=1.0, duration_s=1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        publish_schedule(cameras=1, fps=0.0, duration_s=1.0)


def test_due_order_interleaves_cameras_earliest_first() -> None:
    schedule = publish_schedule(cameras=3, fps=2.0, duration_s=2.0)
    order = list(due_order(schedule))
    assert len(order) == 12
    assert [due for due, _, _ in order] == sorted(due for due, _, _ in order)
    assert [(camera, n) for _, camera, n in order[:4]] == [(0, 0), (1, 0), (2, 0), (0, 1)]


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\]"):
        percentile(values, 101)


def _summary(results: int, dead: int, offered: int = 10) -> LoadSummary:
    return LoadSummary(
        cameras=2,
        fps=1.0,
        duration_s=5.0,
        offered=offered,
        publish_window_s=5.0,
        results=results,
        dead_letters=dead,
        span_s=8.0,
        latencies_ms=tuple(float(v) for v in range(results)),
        lags_ms=(0.5, 2.0),
    )


def test_summary_of_a_fully_answered_run() -> None:
    doc = _summary(results=10, dead=0).as_dict()
    assert doc["offered_rate"] == pytest.approx(2.0)
    assert doc["achieved_rate"] == pytest.approx(10 / 8)
    assert doc["unanswered"] == 0
    assert doc["latency_ms"] == {"p50": pytest.approx(4.5), "p95": pytest.approx(8.55), "p99": pytest.approx(8.91)}
    assert doc["publish_lag_ms"]["max"] == 2.0
    assert doc["achieved_equals_offered"] is True
    json.dumps(doc)


def test_summary_with_a_dead_letter_or_a_missing_answer_is_not_achieved() -> None:
    dead = _summary(results=9, dead=1).as_dict()
    assert (dead["unanswered"], dead["achieved_equals_offered"]) == (0, False)
    missing = _summary(results=7, dead=0).as_dict()
    assert (missing["unanswered"], missing["achieved_equals_offered"]) == (3, False)
    empty = _summary(results=0, dead=0).as_dict()
    assert empty["latency_ms"]["p50"] is None


def test_defect_plan_gives_the_share_spread_through_the_pool() -> None:
    assert defect_plan(4, 0.5) == [(), (DefectKind.SCRATCH,), (), (DefectKind.SPOT,)]
    assert defect_plan(3, 0.0) == [(), (), ()]
    assert all(defect_plan(2, 1.0))


def test_progress_line_shows_offered_answered_rate_and_p50() -> None:
    line = progress_line(LoadProgress(10.0, 40, 80, 30, 1, 42.4, 3.0))
    assert "offered 40/80" in line and "answered 30" in line and "dead 1" in line
    assert "3.0/s" in line and "p50 42 ms" in line


@contextmanager
def stand_in_answerer(client: redis.Redis, line: str, seen: list[InspectionJob]) -> Iterator[None]:
    """Answers every job on ``line`` with a minimal valid result, as a scorer would, but instantly; first it
    writes a result and a dead letter loadgen cannot read (a newer version's), which it must skip."""
    stop = threading.Event()

    def answer() -> None:
        cursor = "0-0"
        while not stop.is_set():
            for _, items in client.xread({NAMES.jobs(line): cursor}, block=100, count=100) or []:
                for entry_id, fields in items:
                    cursor = entry_id.decode()
                    job, _ = decode_job_entry(fields)
                    if not seen:  # loadgen is reading answers by now
                        client.xadd(NAMES.dead, {b"dead": b'{"job_id": "x", "reason": "from_a_newer_version"}'})
                        client.xadd(NAMES.results(line), {b"result": b"{}", b"extra": b"1"})
                    seen.append(job)
                    now = datetime.now(UTC)
                    result = InspectionResult(
                        job_id=job.job_id,
                        camera_id=job.camera_id,
                        line=job.line,
                        model_version="stand-in",
                        width=64,
                        height=64,
                        image_score=0.5,
                        raw_image_score=0.1,
                        is_anomalous=False,
                        pixel_threshold=1.0,
                        image_threshold=1.0,
                        map_ref="s3://anomap-test/maps/x.npz",
                        overlay_ref="s3://anomap-test/overlays/x.jpg",
                        captured_at=job.captured_at,
                        published_at=job.published_at,
                        scored_at=now,
                        latency_ms=(now - job.published_at).total_seconds() * 1e3,
                    )
                    client.xadd(NAMES.results(line), {b"result": result.model_dump_json().encode()})

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_every_published_job_is_counted_once_answered(redis_client: redis.Redis) -> None:
    """2 cameras × 4 fps × 2.5 s on a line; the stand-in answers each job, loadgen must count all 20."""
    pools = camera_images(cameras=2, size=64, pool=2)
    seen: list[InspectionJob] = []
    generator = LoadGenerator(redis_client, NAMES, None, "lg", pools, run_id="t1")
    with stand_in_answerer(redis_client, "lg", seen):
        summary = generator.run(publish_schedule(2, 4.0, 2.5), fps=4.0, duration_s=2.5, grace_s=10.0)
    doc = summary.as_dict()
    assert doc["offered"] == doc["results"] == 20
    assert doc["achieved_equals_offered"] is True
    assert doc["unanswered"] == doc["dead_letters"] == 0
    assert all(doc["latency_ms"][q] is not None for q in ("p50", "p95", "p99"))
    assert sorted(job.job_id for job in seen) == sorted(job_id("t1", c, n) for c in range(2) for n in range(10))
    assert all(job.image_ref is None for job in seen)


def test_by_reference_uploads_the_image_and_sends_its_ref(redis_client: redis.Redis, object_store: ObjectStore) -> None:
    pools = camera_images(cameras=1, size=64, pool=1, defect_share=0.0)
    seen: list[InspectionJob] = []
    generator = LoadGenerator(redis_client, NAMES, object_store, "default", pools, run_id="t2")
    with stand_in_answerer(redis_client, "default", seen):
        summary = generator.run(publish_schedule(1, 4.0, 0.5), fps=4.0, duration_s=0.5, grace_s=10.0)
    assert summary.as_dict()["achieved_equals_offered"] is True
    assert len(seen) == 2
    for job in seen:
        assert job.image_ref is not None
        ref = parse_s3_ref(job.image_ref)
        assert ref.bucket == object_store.bucket
        assert object_store.get_bytes(ref.key) == pools[0][0]


def test_frames_a_full_line_refuses_are_counted_and_the_run_goes_on(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    """A line whose stream is at its cap with nothing answered refuses every frame: the run counts them as
    refused (not offered, not lost), does not have achieved == offered, and leaves no uploaded image behind."""
    line = f"full{uuid.uuid4().hex[:6]}"
    for n in range(2):  # no consumer group yet: nothing on the line is answered
        publish_job(redis_client, NAMES, InspectionJob(job_id=f"old-{n}", line=line), image=b"x", maxlen=2)
    pools = camera_images(cameras=2, size=64, pool=1)
    generator = LoadGenerator(redis_client, NAMES, object_store, line, pools, run_id="t3", maxlen=2)
    summary = generator.run(publish_schedule(2, 4.0, 0.5), fps=4.0, duration_s=0.5, grace_s=30.0)
    doc = summary.as_dict()
    assert (doc["refused"], doc["offered"], doc["results"], doc["unanswered"]) == (4, 0, 0, 0)
    assert doc["achieved_equals_offered"] is False
    assert redis_client.xlen(NAMES.jobs(line)) == 2
    assert list(object_store.list_keys(f"images/{line}/")) == []
    assert "refused 3" in progress_line(LoadProgress(1.0, 0, 4, 0, 0, None, 0.0, refused=3))


def _stack_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    assert settings.redis_url is not None
    monkeypatch.setenv("REDIS_URL", settings.redis_url.get_secret_value())
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(settings.state_dir))
    for name in ("S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def test_loadgen_command_writes_the_summary_and_fails_when_answers_are_missing(
    redis_client: redis.Redis, stack_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _stack_env(monkeypatch, stack_settings)
    line = f"cli{uuid.uuid4().hex[:6]}"
    args = ["loadgen", "--cameras", "2", "--fps", "4", "--duration", "0.5", "--size", "64", "--line", line]
    with stand_in_answerer(redis_client, line, []):
        answered = CliRunner().invoke(app, [*args, "--grace", "10", "--json", str(tmp_path / "lg.json")])
    assert answered.exit_code == 0, answered.output
    doc = json.loads((tmp_path / "lg.json").read_text())
    assert (doc["cameras"], doc["offered"], doc["results"], doc["achieved_equals_offered"]) == (2, 4, 4, True)

    unanswered = CliRunner().invoke(app, [*args, "--grace", "0"])
    assert unanswered.exit_code == 1
    assert "4 jobs were not answered" in unanswered.output


def test_grace_counts_from_the_last_publish_when_publishing_fell_behind() -> None:
    # due by 10 s, but the last job went out at 25 s: the 5 s of grace run to 30 s, not 15 s
    assert not done_waiting(False, 3, 4, elapsed_s=26.0, last_due_s=10.0, last_publish_s=25.0, grace_s=5.0)
    assert done_waiting(False, 3, 4, elapsed_s=30.5, last_due_s=10.0, last_publish_s=25.0, grace_s=5.0)
    assert done_waiting(False, 3, 4, elapsed_s=15.5, last_due_s=10.0, last_publish_s=9.0, grace_s=5.0)  # on time
    assert done_waiting(False, 4, 4, elapsed_s=0.1, last_due_s=10.0, last_publish_s=9.0, grace_s=5.0)  # all in
    assert not done_waiting(True, 4, 4, elapsed_s=99.0, last_due_s=10.0, last_publish_s=9.0, grace_s=5.0)
