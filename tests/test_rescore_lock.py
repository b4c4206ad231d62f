"""One re-scoring run at a time per (model version, source): the marker object in the real SeaweedFS store,
its heartbeat and take-over, the refusal of `rescore` and of the CLI, and readers counting each image once.

Two runs of the same archive at once used to both score everything and write two manifest rows per image.
"""

from __future__ import annotations

import io
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import live_small_model, point_cli_at, small_png
from typer.testing import CliRunner

from cluster.cli import app
from schemas import DeadReason, ModelCard, Settings
from trainer.store import ObjectStore
from workers.archive import ArchiveSource
from workers.rescore import RescoreOptions, rescore
from workers.rescore_lock import RescoreBusy, RunLock
from workers.rescore_manifest import (
    LockState,
    RowStatus,
    RunMarker,
    bad_row,
    latest_rows,
    lock_key,
    lock_state,
    rows_table,
    source_tag,
)
from workers.rescore_parts import ManifestWriter, read_manifest, scored_images

NOW = datetime(2026, 11, 30, 10, 15, tzinfo=UTC)


def _marker(run_id: str, heartbeat: datetime | None = None) -> RunMarker:
    at = heartbeat or datetime.now(UTC)
    return RunMarker(run_id, "/data/lot7", "host-a", 4242, at, at)


@pytest.fixture(scope="module")
def model(stack_settings: Settings) -> tuple[Settings, ModelCard]:
    return live_small_model(stack_settings, "rescore-lock")


def test_run_marker_round_trips_and_says_who_holds_it() -> None:
    marker = RunMarker("20261130T101500-3f9c2a", "s3://a/lot7", "host-a", 4242, NOW, NOW)
    assert RunMarker.from_json(marker.to_json()) == marker
    assert marker.describe(NOW + timedelta(seconds=12)) == (
        "run 20261130T101500-3f9c2a on host-a (pid 4242), started 2026-11-30 10:15:00+0000, last heartbeat 12 s ago"
    )
    for garbage in (b"", b"{}", b'{"run_id": "x"}', b"\xff"):
        with pytest.raises(ValueError, match="not a rescore run marker"):
            RunMarker.from_json(garbage)


def test_only_a_stale_unreadable_or_forced_marker_is_taken_over() -> None:
    fresh, old = _marker("a", NOW - timedelta(seconds=20)), _marker("b", NOW - timedelta(seconds=301))
    assert lock_state(None, False, NOW, 300, force=False) is LockState.FREE
    assert lock_state(fresh, True, NOW, 300, force=False) is LockState.HELD
    assert lock_state(fresh, True, NOW, 300, force=True) is LockState.STALE
    assert lock_state(old, True, NOW, 300, force=False) is LockState.STALE
    assert lock_state(None, True, NOW, 300, force=False) is LockState.STALE  # garbage at the key
    assert lock_key("v1", "lot7-3f9c2a1b") == "rescore/v1/locks/lot7-3f9c2a1b.json"


def test_a_second_run_is_refused_and_a_forced_one_takes_over(object_store: ObjectStore) -> None:
    key = lock_key("v1", "lot7-3f9c2a1b")
    first = RunLock(object_store, key, _marker("run-first"), "/data/lot7 with v1", stale_s=300, heartbeat_s=0.2)
    assert first.acquire() is None
    try:
        second = RunLock(object_store, key, _marker("run-second"), "/data/lot7 with v1", stale_s=300)
        with pytest.raises(RescoreBusy, match=r"another rescore of /data/lot7 with v1 is running: run run-first on"):
            second.acquire()
        with pytest.raises(RescoreBusy, match=r"--force"):
            second.acquire()
        stored = RunMarker.from_json(object_store.get_bytes(key))
        assert stored.run_id == "run-first"
        time.sleep(1.0)  # the heartbeat rewrites the marker
        assert RunMarker.from_json(object_store.get_bytes(key)).heartbeat_at > stored.heartbeat_at

        forced = RunLock(object_store, key, _marker("run-forced"), "/data/lot7 with v1", stale_s=300)
        taken = forced.acquire(force=True)
        assert taken is not None and taken.run_id == "run-first"
        deadline = time.monotonic() + 10
        while first.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.lost is not None and "run-forced" in first.lost  # the first run learns it lost the marker
    finally:
        first.release()
    assert RunMarker.from_json(object_store.get_bytes(key)).run_id == "run-forced"  # not removed by the loser
    forced.release()
    assert not object_store.exists(key)


def test_a_marker_whose_heartbeat_stopped_is_taken_over(object_store: ObjectStore) -> None:
    key = lock_key("v1", "lot7-3f9c2a1b")
    object_store.put_bytes(key, _marker("run-dead", datetime.now(UTC) - timedelta(seconds=400)).to_json())
    lock = RunLock(object_store, key, _marker("run-new"), "/data/lot7 with v1", stale_s=300)
    taken = lock.acquire()
    assert taken is not None and taken.run_id == "run-dead"
    lock.release()
    object_store.put_bytes(key, b"not json")  # unreadable: nobody can be named, so it is taken over
    lock = RunLock(object_store, key, _marker("run-new"), "/data/lot7 with v1", stale_s=300)
    lock.acquire()
    lock.release()


def _take(lock: RunLock, start: threading.Barrier, won: list[RunLock], refused: list[RunLock]) -> None:
    start.wait()
    try:
        lock.acquire()
        won.append(lock)
    except RescoreBusy:
        refused.append(lock)


def test_runs_starting_together_get_the_marker_once(object_store: ObjectStore) -> None:
    """The conditional write (If-None-Match: *) decides between runs that both found no marker."""
    for round_ in range(5):
        key = lock_key("v1", f"race{round_}-3f9c2a1b")
        locks = [RunLock(object_store, key, _marker(f"run-{i}"), "race", stale_s=300) for i in range(4)]
        start = threading.Barrier(len(locks))
        won: list[RunLock] = []
        refused: list[RunLock] = []
        threads = [threading.Thread(target=_take, args=(lock, start, won, refused)) for lock in locks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (len(won), len(refused)) == (1, 3)
        assert RunMarker.from_json(object_store.get_bytes(key)).run_id == won[0].marker.run_id
        won[0].release()


def test_rescore_and_the_cli_refuse_a_source_another_run_is_scoring(
    model: tuple[Settings, ModelCard], ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, card = model
    store = ObjectStore.from_settings(settings)
    archive = tmp_path / "lot7"
    archive.mkdir()
    (archive / "a.png").write_bytes(small_png(1))
    uri = ArchiveSource.parse(str(archive)).uri
    other = RunLock(store, lock_key(card.version, source_tag(uri)), _marker("run-other"), "other", stale_s=300)
    other.acquire()
    try:
        with pytest.raises(
            RescoreBusy, match=rf"another rescore of {uri} with {card.version} is running: run run-other"
        ):
            rescore(settings, str(archive), card.version, RescoreOptions(concurrency=1, cpus_per_actor=0.5))
        point_cli_at(monkeypatch, settings, settings.bucket, tmp_path, redis=False)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the CLI joins the in-process test cluster
        result = CliRunner().invoke(app, ["rescore", str(archive)])
        assert result.exit_code == 2 and "run run-other on host-a" in result.output, result.output
        assert "Traceback" not in result.output
        assert scored_images(store, card.version) == set()  # nothing was scored twice
    finally:
        other.release()


def test_readers_count_an_image_scored_by_two_runs_once_latest_row_wins(object_store: ObjectStore) -> None:
    earlier, later = NOW, NOW + timedelta(minutes=5)

    def row(image: str, run: str, at: datetime, reason: DeadReason) -> dict[str, object]:
        return bad_row(image, image.rsplit("/", 1)[-1], reason, f"by {run}", "v1", run, at)

    for run, at in (("run-a", earlier), ("run-b", later)):  # two runs at once scored /a/x.png both
        writer = ManifestWriter(object_store, "v1", run, flush_rows=100, flush_s=3600)
        writer.add(rows_table([row("/a/x.png", run, at, DeadReason.EMPTY_IMAGE)]))
        if run == "run-a":
            writer.add(rows_table([row("/a/y.png", run, at, DeadReason.UNDECODABLE_IMAGE)]))
        writer.flush()
    raw = sum(
        pq.read_table(io.BytesIO(object_store.get_bytes(key))).num_rows
        for key in object_store.list_keys("rescore/v1/manifest/")
    )
    assert raw == 3
    manifest = read_manifest(object_store, "v1")
    assert sorted(manifest.column("image").to_pylist()) == ["/a/x.png", "/a/y.png"]
    x = next(r for r in manifest.to_pylist() if r["image"] == "/a/x.png")
    assert (x["run_id"], x["detail"]) == ("run-b", "by run-b")
    assert scored_images(object_store, "v1") == {"/a/x.png", "/a/y.png"}


def test_latest_rows_keeps_the_last_of_equal_times() -> None:
    rows = [bad_row("/a/x.png", "x.png", DeadReason.EMPTY_IMAGE, d, "v1", "r", NOW) for d in ("first", "second")]
    rows.append(bad_row("/a/w.png", "w.png", DeadReason.EMPTY_IMAGE, "only", "v1", "r", NOW, RowStatus.BAD))
    kept = latest_rows(rows_table(rows)).to_pylist()
    assert [(r["image"], r["detail"]) for r in kept] == [("/a/w.png", "only"), ("/a/x.png", "second")]
    assert latest_rows(rows_table([])).num_rows == 0
