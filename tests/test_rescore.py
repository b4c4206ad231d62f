"""Archive re-scoring: ``anomap rescore`` on a folder and on ``s3://``, with real SeaweedFS and Ray.

One small model version (untrained networks, calibrated) and one folder of 50 good 64² images plus
three bad files are shared by the module; the first run is a module fixture, later tests look at
what it wrote and run again.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import live_small_model, point_cli_at
from PIL import Image
from typer.testing import CliRunner

from cluster.cli import app
from schemas import DeadReason, ModelCard, Settings
from trainer.imaging import decode_image, encode_png
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind, synth_image
from workers.archive import ArchiveImage, ArchiveSource
from workers.inspection import CPU_FORWARD_PATCHES, GPU_FORWARD_PATCHES, LocalInspector
from workers.maps import decode_map, encode_map
from workers.rescore import RescoreOptions, RescoreSummary, plan_items, rescore
from workers.rescore_manifest import (
    OverlayPolicy,
    RowStatus,
    bad_row,
    manifest_prefix,
    map_stem,
    progress_line,
    region_dicts,
    rows_table,
    safe_relative,
    source_tag,
)
from workers.rescore_parts import ManifestWriter, scored_images

SIZE = 64
N_GOOD = 50
N_BAD = 4
OPTIONS = RescoreOptions(concurrency=2, cpus_per_actor=0.5, torch_threads=1, flush_rows=20)


def _png(seed: int) -> bytes:
    return encode_png(synth_image(seed, SIZE, (DefectKind.SCRATCH,) if seed % 3 == 0 else ())[0])


def _as(data: bytes, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format=fmt)
    return buffer.getvalue()


def _manifest(store: ObjectStore, version: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for key in sorted(store.list_keys(manifest_prefix(version))):
        rows.extend(pq.read_table(io.BytesIO(store.get_bytes(key))).to_pylist())
    return rows


@pytest.fixture(scope="module")
def model(stack_settings: Settings, ray_cluster: object) -> tuple[Settings, ModelCard]:
    return live_small_model(stack_settings, "rescore")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 good images (PNG, a few JPEG/TIFF/BMP, in sub-folders) + a truncated, an empty, a non-image file
    and a dangling link."""
    root = tmp_path_factory.mktemp("archive")
    formats = {7: ("JPEG", ".jpg"), 8: ("TIFF", ".tif"), 9: ("BMP", ".bmp")}
    for seed in range(N_GOOD):
        fmt, suffix = formats.get(seed, ("PNG", ".png"))
        folder = root / f"day{seed % 4}"
        folder.mkdir(exist_ok=True)
        data = _png(seed)
        (folder / f"img {seed:02d}{suffix}").write_bytes(data if fmt == "PNG" else _as(data, fmt))
    (root / "corrupt.png").write_bytes(_png(99)[:300])
    (root / "empty.png").write_bytes(b"")
    (root / "not-an-image.JPG").write_bytes(b"operator notes, not pixels\n" * 4)
    (root / "notes.txt").write_text("ignored: not an image suffix")
    (root / "gone.png").symlink_to(root / "deleted-meanwhile.png")  # listed, then unreadable
    return root


@pytest.fixture(scope="module")
def first_run(model: tuple[Settings, ModelCard], archive: Path) -> RescoreSummary:
    settings, card = model
    return rescore(settings, str(archive), card.version, OPTIONS)


def test_folder_rescore_writes_a_row_and_maps_for_every_image(
    model: tuple[Settings, ModelCard], first_run: RescoreSummary
) -> None:
    settings, card = model
    store = ObjectStore.from_settings(settings)
    assert (first_run.listed, first_run.skipped, first_run.scored, first_run.bad) == (N_GOOD + N_BAD, 0, N_GOOD, N_BAD)
    assert len(first_run.manifest_parts) >= 3  # flushed every 20 rows
    rows = _manifest(store, card.version)
    assert len(rows) == N_GOOD + N_BAD and len({row["image"] for row in rows}) == N_GOOD + N_BAD
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == N_GOOD
    for row in ok:
        assert row["model_version"] == card.version and row["reason"] is None
        assert (row["width"], row["height"]) == (SIZE, SIZE)
        assert row["image_score"] == pytest.approx(row["raw_image_score"] / card.thresholds.image)
        assert store.exists(row["map_key"])
        if row["is_anomalous"]:  # overlays only for images a person would open (OverlayPolicy.ANOMALOUS)
            assert store.exists(row["overlay_key"])
        else:
            assert row["overlay_key"] is None
        assert row["map_key"].startswith(f"rescore/{card.version}/maps/")
    assert any(row["regions"] for row in ok)
    assert any(row["is_anomalous"] for row in ok) and not all(row["is_anomalous"] for row in ok)
    assert {"x", "y", "width", "height", "area", "peak_score"} <= set(next(r for r in ok if r["regions"])["regions"][0])


def test_bad_images_are_in_the_manifest_with_the_services_reason(
    model: tuple[Settings, ModelCard], first_run: RescoreSummary
) -> None:
    settings, card = model
    bad = {
        Path(str(row["image"])).name: row
        for row in _manifest(ObjectStore.from_settings(settings), card.version)
        if row["status"] == "bad"
    }
    assert bad["corrupt.png"]["reason"] == DeadReason.UNDECODABLE_IMAGE
    assert bad["empty.png"]["reason"] == DeadReason.EMPTY_IMAGE
    assert bad["not-an-image.JPG"]["reason"] == DeadReason.UNDECODABLE_IMAGE
    assert bad["gone.png"]["reason"] == DeadReason.MISSING_OBJECT
    assert all(row["detail"] and row["map_key"] is None for row in bad.values())


def test_second_run_scores_none_again(
    model: tuple[Settings, ModelCard], archive: Path, first_run: RescoreSummary
) -> None:
    settings, card = model
    again = rescore(settings, str(archive), card.version, OPTIONS)
    assert (again.listed, again.skipped) == (N_GOOD + N_BAD, N_GOOD + N_BAD)
    assert (again.scored, again.bad, again.manifest_parts) == (0, 0, [])


def test_maps_equal_the_in_process_inspector(
    model: tuple[Settings, ModelCard], archive: Path, first_run: RescoreSummary
) -> None:
    settings, card = model
    store = ObjectStore.from_settings(settings)
    _, weights = ModelRegistry(store, settings.model_name).load(card.version)
    inspector = LocalInspector(PatchModel.from_safetensors(card, weights, device="cpu"), OPTIONS.forward_size)
    rows = {row["relative_path"]: row for row in _manifest(store, card.version)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors: the same forward passes, bit for bit
    try:
        scored = {
            relative: inspector(decode_image((archive / relative).read_bytes()))
            for relative in ("day0/img 00.png", "day3/img 07.jpg", "day1/img 09.bmp", "day1/img 49.png")
        }
    finally:
        torch.set_num_threads(threads)
    for relative, local in scored.items():
        stored = decode_map(store.get_bytes(rows[relative]["map_key"]))
        np.testing.assert_array_equal(stored, decode_map(encode_map(local.anomaly_map)))  # as stored: float16
        assert rows[relative]["raw_image_score"] == local.summary.raw_image_score
        assert rows[relative]["regions"] == region_dicts(local.summary.regions)


def test_s3_source_through_the_cli_and_a_rerun_skips_it(
    model: tuple[Settings, ModelCard], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, card = model
    store = ObjectStore.from_settings(settings)
    for i in range(4):
        store.put_bytes(f"archive/lot9/cam{i}/{i:03d}.png", _png(100 + i), "image/png")
    store.put_bytes("archive/lot9/broken.png", _png(104)[:200], "image/png")
    store.put_bytes("archive/lot90/elsewhere.png", _png(105), "image/png")  # another prefix: not listed
    point_cli_at(monkeypatch, settings, settings.bucket, tmp_path, redis=False)
    args = ["rescore", f"s3://{settings.bucket}/archive/lot9/", "--concurrency", "1", "--cpus-per-actor", "0.5"]
    result = CliRunner().invoke(app, args)  # --model: the live version
    assert result.exit_code == 0, result.output
    assert "scored 4, bad 1, skipped 0" in result.output
    rows = [r for r in _manifest(store, card.version) if str(r["image"]).startswith("s3://")]
    names = sorted(str(r["image"]).rsplit("/", 1)[-1] for r in rows)
    assert names == ["000.png", "001.png", "002.png", "003.png", "broken.png"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "scored 0, bad 0, skipped 5" in again.output


def test_unknown_version_and_missing_folder_are_one_line_errors(
    model: tuple[Settings, ModelCard], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, _ = model
    point_cli_at(monkeypatch, settings, settings.bucket, tmp_path, redis=False)
    for args, message in (
        (["rescore", str(tmp_path), "--model", "v-nope"], "has no version 'v-nope'"),
        (["rescore", str(tmp_path / "nope")], "is not a folder"),
        (["rescore", str(tmp_path), "--model", "../x"], "invalid model version"),
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_error_rows_stay_out_of_the_manifest_so_a_rerun_retries_them(model: tuple[Settings, ModelCard]) -> None:
    settings, _ = model
    store = ObjectStore.from_settings(settings)
    at = datetime.now(UTC)
    writer = ManifestWriter(store, "v-writer", "run1", flush_rows=100, flush_s=3600)
    writer.add(
        rows_table(
            [
                bad_row("/a/x.png", "x.png", DeadReason.EMPTY_IMAGE, "zero bytes", "v-writer", "run1", at),
                bad_row(
                    "/a/y.png",
                    "y.png",
                    DeadReason.SCORING_FAILED,
                    "store away",
                    "v-writer",
                    "run1",
                    at,
                    RowStatus.ERROR,
                ),
            ]
        )
    )
    assert writer.parts == []  # not due yet
    writer.flush()
    assert writer.parts == ["rescore/v-writer/manifest/part-run1-00000.parquet"]
    assert scored_images(store, "v-writer") == {"/a/x.png"}


def test_map_keys_are_safe_and_distinct() -> None:
    assert safe_relative("a/b.png") == "a/b.png"
    assert safe_relative("a b/c.png") != safe_relative("a_b/c.png")  # replaced characters add a digest
    assert safe_relative(".hidden/x.png").startswith("_hidden/")
    assert safe_relative("-scan.png").startswith("_scan.png-")  # ordinary names, not unsafe ones
    assert safe_relative("a/=b/c.png").startswith("a/_b/c.png-")
    for unsafe in ("../x.png", "/etc/x.png", "a//b.png", "a/./b.png", "", "a/" * 500 + "b.png"):
        with pytest.raises(ValueError, match="unsafe relative path"):
            safe_relative(unsafe)
    assert map_stem("v1", "lot-0a1b2c3d", "d/x.png") == "rescore/v1/maps/lot-0a1b2c3d/d/x.png"
    assert source_tag("s3://a/lot7") != source_tag("/data/lot7") and source_tag("/data/lot7").startswith("lot7-")
    with pytest.raises(ValueError, match="invalid model version"):
        map_stem("../v1", "lot-0a1b2c3d", "x.png")


def test_oversized_and_unsafe_images_are_rejected_before_reading() -> None:
    images = [ArchiveImage("s3://b/p/ok.png", "ok.png", 10), ArchiveImage("s3://b/p/big.png", "big.png", 11)]
    images.append(ArchiveImage("s3://b/p/../x.png", "../x.png", 5))
    items, early = plan_items(images, "v1", "p-00000000", "run", max_file_bytes=10)
    assert [item["relative"] for item in items] == ["ok.png"]
    assert items[0]["map_key"] == "rescore/v1/maps/p-00000000/ok.png.npz"
    assert [(row["relative_path"], row["reason"]) for row in early] == [
        ("big.png", "payload_too_large"),
        ("../x.png", "invalid_entry"),
    ]


def test_a_file_name_that_is_not_utf8_is_a_bad_row_a_manifest_can_hold(tmp_path: Path) -> None:
    import os

    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes from an old share: Python keeps them as a surrogate
    (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ok.png").write_bytes(b"x")
    images = ArchiveSource.parse(str(tmp_path)).list_images(store=None)  # type: ignore[arg-type]
    items, early = plan_items(images, "v1", "p-00000000", "run", max_file_bytes=10)
    assert [item["relative"] for item in items] == ["ok.png"]
    [row] = early
    assert (row["relative_path"], row["reason"]) == ("caf\\xe9.png", "invalid_entry")
    assert row["image"] == f"{tmp_path}/caf\\xe9.png" and "rename it" in row["detail"]
    rows_table(early)  # the manifest can hold it (a surrogate made pyarrow fail and ended the whole run)


def test_linked_folders_are_followed_once_and_unreadable_ones_are_named(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "archive", tmp_path / "elsewhere"
    (root / "lot1").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "lot1/a.png").write_bytes(b"x")
    (elsewhere / "b.png").write_bytes(b"x")
    (root / "lot2").symlink_to(elsewhere)  # an archive assembled from links
    (root / "lot1/loop").symlink_to(root)  # and a link back up: listed once, not forever
    unreadable: list[str] = []
    images = ArchiveSource.parse(str(root)).list_images(store=None, unreadable=unreadable)  # type: ignore[arg-type]
    assert [image.relative for image in images] == ["lot1/a.png", "lot2/b.png"]
    assert unreadable == []
    walk_errors: list[str] = []
    ArchiveSource._list_folder(root / "gone", walk_errors)  # a folder removed while listing
    assert walk_errors and "gone" in walk_errors[0]


def test_s3_source_parsing_and_progress_line() -> None:
    source = ArchiveSource.parse("s3://archive/2025/lot7/")
    assert (source.bucket, source.prefix, source.uri) == ("archive", "2025/lot7/", "s3://archive/2025/lot7")
    assert ArchiveSource.parse("s3://archive").prefix == ""
    with pytest.raises(ValueError, match="invalid bucket name"):
        ArchiveSource.parse("s3://A_B/x")
    assert progress_line(120, 500, 3, 100.0) == "120/500 images (24 %), 1.20 images/s, ETA 5 min 17 s, 3 bad"
    assert progress_line(0, 500, 0, 0.0) == "0/500 images (0 %), 0 bad"


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the CLI joins the in-process test cluster
    yield


def test_overlay_policy_says_which_images_get_an_overlay() -> None:
    assert OverlayPolicy("all").wants(False) and OverlayPolicy("all").wants(True)
    assert OverlayPolicy("anomalous").wants(True) and not OverlayPolicy("anomalous").wants(False)
    assert not OverlayPolicy("none").wants(True)
    with pytest.raises(ValueError, match="'some'"):
        OverlayPolicy("some")


def test_forward_passes_follow_the_actors_device_unless_given() -> None:
    assert RescoreOptions().forward_size == CPU_FORWARD_PATCHES
    assert RescoreOptions(gpus_per_actor=0.5).forward_size == GPU_FORWARD_PATCHES
    assert RescoreOptions(gpus_per_actor=0.5, forward_patches=64).forward_size == 64
