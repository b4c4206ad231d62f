"""Archive re-scoring when things go wrong, against the real SeaweedFS store and Ray cluster: reads that
will never work (bad rows at once, naming the errno or S3 code), the consumer's suffix-less kept images,
sources that give nothing, manifest parts that cannot be read or written, and an image that kills its
scoring actor.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
import ray.cloudpickle
import torch
import urllib3.exceptions
from helpers import live_small_model, point_cli_at, small_png
from minio.error import S3Error
from typer.testing import CliRunner

from cluster.cli import app
from schemas import DeadReason, ModelCard, Settings
from trainer.store import ObjectMissing, ObjectStore
from workers.archive import (
    ArchiveSource,
    UnreadableImage,
    is_listed_image,
    is_transient_error,
    permanent_read_detail,
)
from workers.rescore import ACTOR_TASK_RETRIES, RescoreOptions, plan_items, rescore, scored_batches
from workers.rescore_actor import ImageRescorer
from workers.rescore_manifest import RowStatus, bad_row, part_key, rows_table
from workers.rescore_parts import ManifestError, ManifestWriteError, ManifestWriter, read_manifest, scored_images

OPTIONS = RescoreOptions(concurrency=1, cpus_per_actor=0.5, torch_threads=1)


def _s3_error(code: str) -> S3Error:
    return S3Error(None, code, f"{code} message", "/b/k", "req", "host")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model(stack_settings: Settings) -> tuple[Settings, ModelCard]:
    return live_small_model(stack_settings, "rescore-fail")


@pytest.fixture
def cli(
    model: tuple[Settings, ModelCard], ray_cluster: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[CliRunner]:
    settings, _ = model
    point_cli_at(monkeypatch, settings, settings.bucket, tmp_path, redis=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the CLI joins the in-process test cluster
    yield CliRunner()


def test_reads_that_will_never_work_are_named_and_only_connection_failures_retried() -> None:
    image = "s3://archive/lot7/a.png"
    for code in ("AccessDenied", "InvalidObjectState", "NoSuchBucket"):
        detail = permanent_read_detail(image, _s3_error(code))
        assert detail == f"cannot read {image}: {code} ({code} message)"
        assert not is_transient_error(_s3_error(code))
    assert permanent_read_detail(image, ObjectMissing(image)) == f"{image} does not exist (any more)"
    for number in (errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENAMETOOLONG, errno.EISDIR, errno.ENOENT):
        failure = OSError(number, os.strerror(number))
        detail = permanent_read_detail("/data/a.png", failure)
        assert detail is not None and errno.errorcode[number] in detail, detail
        assert not is_transient_error(failure)
    for passing in (
        _s3_error("SlowDown"),
        _s3_error("ServiceUnavailable"),
        OSError(errno.EIO, "I/O error"),
        OSError(errno.ESTALE, "stale file handle"),
        ConnectionResetError(),
        urllib3.exceptions.MaxRetryError(None, "/b/k"),  # type: ignore[arg-type]
    ):
        assert permanent_read_detail(image, passing) is None and is_transient_error(passing), passing
    assert not is_transient_error(_s3_error("SomethingNew"))  # unknown: an error row at once, not 30 s of retries
    assert not is_transient_error(ValueError("a bug"))


def test_local_files_that_cannot_be_read_are_bad_rows_at_once(
    model: tuple[Settings, ModelCard], tmp_path: Path
) -> None:
    """A link loop and a too-long link target were retried for 30 s and never recorded; a FIFO named *.png
    blocked its actor for ever."""
    settings, card = model
    (tmp_path / "ok.png").write_bytes(small_png(1))
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "long.png").symlink_to("x" * 300)
    os.mkfifo(tmp_path / "pipe.png")
    source = ArchiveSource.parse(str(tmp_path))
    items, early = plan_items(source.list_images(store=None), card.version, "t-00000000", "run", 1 << 20)  # type: ignore[arg-type]
    assert early == [] and len(items) == 4
    threads = torch.get_num_threads()
    try:
        rescorer = ImageRescorer(settings, card.version, source, "run")
        started = time.monotonic()
        rows = {Path(item["image"]).name: rescorer.score(item) for item in items}
        elapsed = time.monotonic() - started
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 10, f"{elapsed:.1f} s: permanent failures must not be retried"
    assert rows["ok.png"]["status"] == "ok"
    expected = {"loop.png": "ELOOP", "long.png": "ENAMETOOLONG", "pipe.png": "is not a regular file (a FIFO)"}
    for name, named in expected.items():
        row = rows[name]
        assert (row["status"], row["reason"]) == ("bad", DeadReason.MISSING_OBJECT), row
        assert named in row["detail"] and str(tmp_path / name) in row["detail"], row["detail"]


def test_an_s3_object_gone_after_listing_is_unreadable_naming_it(object_store: ObjectStore) -> None:
    object_store.put_bytes("archive/a.png", small_png(1), "image/png")
    source = ArchiveSource.parse(f"s3://{object_store.bucket}/archive")
    [image] = source.list_images(object_store)
    object_store.delete("archive/a.png")
    with pytest.raises(UnreadableImage, match=rf"s3://{object_store.bucket}/archive/a.png does not exist"):
        source.read(object_store, image)


def test_the_consumers_kept_images_without_a_suffix_are_listed(object_store: ObjectStore, tmp_path: Path) -> None:
    """``anomap rescore s3://<bucket>/images/<line>/scored`` listed nothing: the consumer keeps each job's
    image as ``images/<line>/scored/<job_id>``, with no suffix."""
    object_store.put_bytes("images/line-a/scored/cam01-1", small_png(1), "image/png")
    object_store.put_bytes("images/line-a/scored/cam01-2", small_png(2), "image/png")
    object_store.put_bytes("images/line-a/scored/notes.txt", b"not an image")
    object_store.put_bytes("images/line-a/uploads/readme", b"not in a scored folder")
    for prefix in ("images/line-a/scored", "images"):
        source = ArchiveSource.parse(f"s3://{object_store.bucket}/{prefix}")
        keys = [image.image.rsplit("/", 1)[-1] for image in source.list_images(object_store)]
        assert keys == ["cam01-1", "cam01-2"], prefix
    (tmp_path / "scored").mkdir()
    (tmp_path / "scored" / "cam01-3").write_bytes(small_png(3))
    (tmp_path / "readme").write_bytes(b"x")
    assert [i.relative for i in ArchiveSource.parse(str(tmp_path)).list_images(store=None)] == ["scored/cam01-3"]  # type: ignore[arg-type]
    assert is_listed_image("images/a/scored/cam01-7") and is_listed_image("x/Y.TIF")
    assert not is_listed_image("images/a/scored/") and not is_listed_image("scored/notes.md")
    assert not is_listed_image("images/a/scored/cam01-7/more")


def _too_deep_folder(root: Path) -> Path:
    """A folder whose path is longer than PATH_MAX: listing it fails (ENAMETOOLONG) even for root."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(20):
            os.mkdir("d" * 250, dir_fd=fd)
            deeper = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
    finally:
        os.close(fd)
    return root / ("d" * 250)


def test_a_source_without_images_or_with_an_unreadable_folder_exits_2(
    model: tuple[Settings, ModelCard], cli: CliRunner, tmp_path: Path
) -> None:
    settings, _ = model
    typo = cli.invoke(app, ["rescore", f"s3://{settings.bucket}/archive/lot-typo"])
    assert typo.exit_code == 2, typo.output
    assert f"s3://{settings.bucket}/archive/lot-typo has no images to score" in typo.output

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.png").write_bytes(small_png(1))
    deep = _too_deep_folder(archive)
    try:
        partial = cli.invoke(app, ["rescore", str(archive), "--concurrency", "1", "--cpus-per-actor", "0.5"])
    finally:
        shutil.rmtree(deep)
    assert partial.exit_code == 2, partial.output
    assert "scored 1, bad 0" in partial.output  # what could be read was scored
    assert f"1 folders of {archive} could not be read" in partial.output and "Traceback" not in partial.output


def test_a_manifest_part_that_cannot_be_read_is_named(model: tuple[Settings, ModelCard], cli: CliRunner) -> None:
    settings, card = model
    store = ObjectStore.from_settings(settings)
    key = part_key(card.version, "20261130T000000-broken", 0)
    store.put_bytes(key, b"PAR1 truncated by a full disk")
    store.put_bytes("lot-m/a.png", small_png(1), "image/png")
    try:
        with pytest.raises(ManifestError, match=rf"manifest part s3://{settings.bucket}/{key} cannot be read"):
            scored_images(store, card.version)
        with pytest.raises(ManifestError, match=key):
            read_manifest(store, card.version)
        result = cli.invoke(app, ["rescore", f"s3://{settings.bucket}/lot-m"])
        assert result.exit_code == 2 and key in result.output and "Traceback" not in result.output, result.output
    finally:
        store.delete(key)


def test_a_manifest_write_that_fails_says_what_was_recorded(object_store: ObjectStore) -> None:
    """A store that refuses the part for good (its bucket is gone) is said at once, not after 30 s of retries
    and a traceback, with what this run recorded and what it did not."""
    rows = rows_table(
        [
            bad_row(f"/a/{name}", name, DeadReason.EMPTY_IMAGE, "zero bytes", "v1", "run1", datetime.now(UTC))
            for name in ("x.png", "y.png", "z.png")
        ]
    )
    writer = ManifestWriter(object_store, "v1", "run1", flush_rows=100, flush_s=3600)
    writer.add(rows.slice(0, 1))
    writer.flush()
    for key in object_store.list_keys(""):
        object_store.delete(key)
    object_store.client.remove_bucket(object_store.bucket)
    writer.add(rows.slice(1, 2))
    started = time.monotonic()
    with pytest.raises(ManifestWriteError) as raised:
        writer.flush()
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert f"could not write manifest part {object_store.ref(part_key('v1', 'run1', 1))}: NoSuchBucket" in message
    assert "not recorded: 2 rows" in message and "recorded by this run: 1 rows in 1 parts" in message
    writer.flush()  # after a failure nothing more is tried (the run's final flush must not retry it)
    object_store.ensure_bucket()  # for the fixture's clean-up


class ActorKiller:
    """A scoring actor whose process dies on ``die.png`` (as a decoder crash or the OOM killer would)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for item in batch.to_pylist():
            if item["relative"] == "die.png":
                os._exit(1)
            now, ok = datetime.now(UTC), RowStatus.OK
            rows.append(bad_row(item["image"], item["relative"], DeadReason.EMPTY_IMAGE, "ok", "v1", "r", now, ok))
        return rows_table(rows)


def test_an_image_that_kills_its_actor_becomes_an_error_row_and_the_run_goes_on(ray_cluster: str) -> None:
    """Ray Data retried such an image on a restarted actor for ever; now it is tried a bounded number of times."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor class lives in this test module
    try:
        items = [
            {"image": f"/a/{name}", "relative": name, "size": 1, "map_key": "m", "overlay_key": "o"}
            for name in ("a.png", "die.png", "b.png", "c.png")
        ]
        started = time.monotonic()
        tables = list(scored_batches(items, ActorKiller, (), OPTIONS, 1, "v1", "run1"))
        elapsed = time.monotonic() - started
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    rows = {row["relative_path"]: row for row in pa.concat_tables(tables).to_pylist()}
    assert {name: row["status"] for name, row in rows.items()} == {
        "a.png": "ok",
        "b.png": "ok",
        "c.png": "ok",
        "die.png": "error",
    }
    assert f"died (or raised) on each of {2 + ACTOR_TASK_RETRIES} tries, the last alone" in rows["die.png"]["detail"]
    assert elapsed < 240


def test_a_whole_run_leaves_no_marker_behind(model: tuple[Settings, ModelCard], ray_cluster: str) -> None:
    settings, card = model
    store = ObjectStore.from_settings(settings)
    store.put_bytes("lot-ok/images/line-a/scored/cam01-1", small_png(4), "image/png")
    summary = rescore(settings, f"s3://{settings.bucket}/lot-ok", card.version, OPTIONS)
    assert (summary.listed, summary.scored, summary.errors) == (1, 1, 0)
    assert list(store.list_keys(f"rescore/{card.version}/locks/")) == []
