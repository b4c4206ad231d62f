"""Confirmations: published on ``anomap:confirmations``, filed into ``datasets/<line>/`` with real Valkey
and SeaweedFS; bad ones become dead letters with a reason; the same one twice writes once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
from helpers import SIZE, point_cli_at, register_small_model, small_png
from typer.testing import CliRunner

from cluster.cli import app
from schemas import Box, Confirmation, DeadLetter, DeadReason, InspectionJob, Settings, StreamNames
from schemas.confirmation import CONFIRMATION_FIELD
from schemas.stream import entry_marker
from trainer.imaging import decode_image, encode_png
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind
from workers import datasets
from workers.confirmations import IngestConfig, ingest_confirmations, publish_confirmation
from workers.consumer import ConsumerConfig, Outcome, StreamConsumer
from workers.inspection import LocalInspector
from workers.publisher import image_key, publish_job, upload_image
from workers.results import read_dead_letters
from workers.scored_images import scored_image_key, scored_png

NAMES = StreamNames()
runner = CliRunner()
ABNORMAL = "datasets/default/abnormal"
NORMAL = "datasets/default/normal"


def _kept(store: ObjectStore, job_id: str, seed: int = 1, line: str = "default") -> bytes:
    """Keep ``job_id``'s image bytes as the consumer does; returns the PNG that filing it must write."""
    payload = small_png(seed, (DefectKind.SCRATCH,))
    store.put_bytes(scored_image_key(line, job_id), payload, "image/png")
    return scored_png(decode_image(payload))


def _ingest(client: redis.Redis, store: ObjectStore) -> dict[str, int]:
    counts = ingest_confirmations(client, store, NAMES, IngestConfig(consumer="t", block_ms=10))
    return {outcome.value: n for outcome, n in counts.items() if n}


def _keys(store: ObjectStore) -> set[str]:
    return set(store.list_keys("datasets/"))


def _dead(client: redis.Redis) -> list[DeadLetter]:
    return [letter for _, letter in read_dead_letters(client, NAMES)]


def _pending(client: redis.Redis) -> int:
    return int(client.xpending(NAMES.confirmations, NAMES.dataset_group)["pending"])


def test_abnormal_confirmation_with_boxes_files_the_image_and_a_clipped_mask(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    image = _kept(object_store, "cam01-1")
    boxes = [Box(x=120, y=0, width=20, height=4), Box(x=10, y=20, width=5, height=3)]
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-1", label="abnormal", boxes=boxes))
    assert _ingest(redis_client, object_store) == {"written": 1}
    assert _keys(object_store) == {f"{ABNORMAL}/cam01-1.png", f"{ABNORMAL}/cam01-1_mask.png"}
    assert object_store.get_bytes(f"{ABNORMAL}/cam01-1.png") == image
    mask = decode_image(object_store.get_bytes(f"{ABNORMAL}/cam01-1_mask.png")) > 0
    expected = np.zeros((SIZE, SIZE), dtype=bool)
    expected[0:4, 120:128] = True  # clipped at the right edge
    expected[20:23, 10:15] = True
    assert np.array_equal(mask, expected)
    assert _pending(redis_client) == 0 and _dead(redis_client) == []


def test_normal_confirmation_joins_the_normal_data(redis_client: redis.Redis, object_store: ObjectStore) -> None:
    image = _kept(object_store, "cam01-2")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-2", label="normal", confirmed_by="ana"))
    assert _ingest(redis_client, object_store) == {"written": 1}
    assert _keys(object_store) == {f"{NORMAL}/cam01-2.png"}
    assert object_store.get_bytes(f"{NORMAL}/cam01-2.png") == image


def test_the_same_confirmation_twice_writes_its_objects_once(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    _kept(object_store, "cam01-3")
    confirmation = Confirmation(job_id="cam01-3", label="abnormal", boxes=[Box(x=1, y=1, width=8, height=8)])
    publish_confirmation(redis_client, NAMES, confirmation)
    publish_confirmation(redis_client, NAMES, confirmation)
    assert _ingest(redis_client, object_store) == {"written": 1, "unchanged": 1}
    publish_confirmation(redis_client, NAMES, confirmation)
    assert _ingest(redis_client, object_store) == {"unchanged": 1}
    assert _keys(object_store) == {f"{ABNORMAL}/cam01-3.png", f"{ABNORMAL}/cam01-3_mask.png"}


def test_a_changed_label_moves_the_image(redis_client: redis.Redis, object_store: ObjectStore) -> None:
    _kept(object_store, "cam01-4")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-4", label="normal"))
    _ingest(redis_client, object_store)
    assert _keys(object_store) == {f"{NORMAL}/cam01-4.png"}
    box = Box(x=0, y=0, width=4, height=4)
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-4", label="abnormal", boxes=[box]))
    assert _ingest(redis_client, object_store) == {"written": 1}
    assert _keys(object_store) == {f"{ABNORMAL}/cam01-4.png", f"{ABNORMAL}/cam01-4_mask.png"}
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-4", label="normal"))
    assert _ingest(redis_client, object_store) == {"written": 1}
    assert _keys(object_store) == {f"{NORMAL}/cam01-4.png"}


def test_bad_confirmations_become_dead_letters_with_a_reason_and_the_reader_goes_on(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    _kept(object_store, "cam01-5")
    small_mask = encode_png(np.ones((64, 64), dtype=bool))
    object_store.put_bytes("images/default/masks/m.png", small_mask)
    mask_ref = object_store.ref("images/default/masks/m.png")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="nobody-1", label="abnormal"))
    redis_client.xadd(NAMES.confirmations, {CONFIRMATION_FIELD: b"{not json"})
    redis_client.xadd(NAMES.confirmations, {CONFIRMATION_FIELD: b'{"job_id": "cam01-5", "label": "maybe"}'})
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-5", label="abnormal", mask_ref=mask_ref))
    elsewhere = "s3://another-teams-bucket/masks/m.png"  # not the service's bucket: refused unread
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-5", label="abnormal", mask_ref=elsewhere))
    outside = Box(x=500, y=0, width=4, height=4)
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-5", label="abnormal", boxes=[outside]))
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-5", label="normal"))
    assert _ingest(redis_client, object_store) == {"dead": 6, "written": 1}
    reasons = [(letter.job_id, letter.reason) for letter in _dead(redis_client)]
    assert reasons == [
        ("nobody-1", DeadReason.UNKNOWN_JOB),
        (None, DeadReason.INVALID_JSON),
        ("cam01-5", DeadReason.INVALID_SCHEMA),
        ("cam01-5", DeadReason.MASK_SIZE_MISMATCH),
        ("cam01-5", DeadReason.FORBIDDEN_OBJECT),
        ("cam01-5", DeadReason.BOX_OUTSIDE_IMAGE),
    ]
    letters = _dead(redis_client)
    assert all(letter.stream == NAMES.confirmations for letter in letters)
    assert "64×64" in letters[3].detail and f"{SIZE}×{SIZE}" in letters[3].detail
    assert "nobody-1" in letters[0].detail
    assert letters[4].detail.startswith("mask: s3://another-teams-bucket/masks/m.png is in bucket")
    assert _keys(object_store) == {f"{NORMAL}/cam01-5.png"}
    assert _pending(redis_client) == 0


def test_nothing_is_acknowledged_before_it_is_written(
    redis_client: redis.Redis, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kept(object_store, "cam01-6")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-6", label="normal"))

    def store_away(*_: object, **__: object) -> None:
        raise ConnectionError("store away")

    with monkeypatch.context() as patch:
        patch.setattr(object_store, "put_bytes", store_away)
        assert _ingest(redis_client, object_store) == {"retry": 1}
    assert _pending(redis_client) == 1 and _keys(object_store) == set()
    assert _ingest(redis_client, object_store) == {"written": 1}  # the same reader finds it in its pending list
    assert _pending(redis_client) == 0 and _keys(object_store) == {f"{NORMAL}/cam01-6.png"}


def test_an_older_confirmation_retried_late_does_not_undo_a_newer_one(
    redis_client: redis.Redis, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kept(object_store, "cam01-9")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-9", label="normal"))
    box = Box(x=0, y=0, width=4, height=4)  # the operator corrects it a moment later
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-9", label="abnormal", boxes=[box]))
    put_bytes = object_store.put_bytes

    def away_for_the_first(key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if key.startswith(NORMAL):
            raise ConnectionError("store away")
        put_bytes(key, data, content_type)

    with monkeypatch.context() as patch:
        patch.setattr(object_store, "put_bytes", away_for_the_first)
        assert _ingest(redis_client, object_store) == {"retry": 1, "written": 1}
    assert _ingest(redis_client, object_store) == {"superseded": 1}  # the first, from the pending list
    assert _keys(object_store) == {f"{ABNORMAL}/cam01-9.png", f"{ABNORMAL}/cam01-9_mask.png"}
    assert _pending(redis_client) == 0


def test_a_job_id_that_names_another_jobs_mask_is_refused(redis_client: redis.Redis, object_store: ObjectStore) -> None:
    _kept(object_store, "cam01-7")
    _kept(object_store, "cam01-7_mask", seed=2)
    box = Box(x=0, y=0, width=4, height=4)
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-7", label="abnormal", boxes=[box]))
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-7_mask", label="abnormal"))
    assert _ingest(redis_client, object_store) == {"written": 1, "dead": 1}
    [letter] = _dead(redis_client)
    assert (letter.job_id, letter.reason) == ("cam01-7_mask", DeadReason.INVALID_SCHEMA)
    assert "taken by the mask of job 'cam01-7'" in letter.detail
    assert _keys(object_store) == {f"{ABNORMAL}/cam01-7.png", f"{ABNORMAL}/cam01-7_mask.png"}


def test_without_a_kept_image_the_jobs_stream_entry_is_used(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    inline, by_ref = InspectionJob(job_id="cam02-1"), InspectionJob(job_id="cam02-2")
    png = small_png(3)
    entry = publish_job(redis_client, NAMES, inline, image=png)
    redis_client.set(NAMES.done_marker(inline.job_id), entry)  # an older release's marker: the bare entry id
    ref = upload_image(object_store, image_key(by_ref), small_png(4))
    entry = publish_job(redis_client, NAMES, by_ref.model_copy(update={"image_ref": ref}))
    redis_client.set(NAMES.done_marker(by_ref.job_id), entry_marker(NAMES.jobs(), entry))  # a consumer's
    for job_id in (inline.job_id, by_ref.job_id):
        publish_confirmation(redis_client, NAMES, Confirmation(job_id=job_id, label="normal"))
    assert _ingest(redis_client, object_store) == {"written": 2}
    assert decode_image(object_store.get_bytes(f"{NORMAL}/cam02-1.png")).tolist() == decode_image(png).tolist()
    assert object_store.exists(f"{NORMAL}/cam02-2.png")


def _env(monkeypatch: pytest.MonkeyPatch, settings: Settings, bucket: str, tmp_path: Path) -> None:
    point_cli_at(monkeypatch, settings, bucket, tmp_path)


def test_scored_job_confirmed_on_the_command_line_lands_in_datasets(
    redis_client: redis.Redis,
    object_store: ObjectStore,
    stack_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    card = register_small_model(object_store, "metal")
    _, weights = ModelRegistry(object_store, "metal").load(card.version)
    inspector = LocalInspector(PatchModel.from_safetensors(card, weights, device="cpu"))
    consumer = StreamConsumer(redis_client, object_store, inspector, NAMES, ConsumerConfig(consumer="c"))
    consumer.ensure_groups()
    png = small_png(5, (DefectKind.SCRATCH,))
    publish_job(redis_client, NAMES, InspectionJob(job_id="cam03-1"), image=png)
    [(stream, [(entry_id, fields)])] = redis_client.xreadgroup(NAMES.scorer_group, "c", {NAMES.jobs(): ">"})
    assert consumer.process_entry(stream.decode(), entry_id.decode(), fields, 1) is Outcome.RESULT
    redis_client.xtrim(NAMES.jobs(), maxlen=0)  # the inline image is gone from the stream; the kept one is not

    _env(monkeypatch, stack_settings, object_store.bucket, tmp_path)
    mask = tmp_path / "mask.png"
    marks = np.zeros((SIZE, SIZE), dtype=bool)
    marks[40:50, 30:90] = True
    mask.write_bytes(encode_png(marks))
    outcome = runner.invoke(app, ["confirm", "cam03-1", "--abnormal", "--mask", str(mask), "--by", "ana"])
    assert outcome.exit_code == 0, outcome.output
    outcome = runner.invoke(app, ["confirmations", "ingest", "--once"])
    assert outcome.exit_code == 0, outcome.output
    assert '"written": 1' in outcome.stdout
    assert decode_image(object_store.get_bytes(f"{ABNORMAL}/cam03-1.png")).tolist() == decode_image(png).tolist()
    assert np.array_equal(decode_image(object_store.get_bytes(f"{ABNORMAL}/cam03-1_mask.png")) > 0, marks)


def test_a_refused_confirmation_uploads_no_mask(
    object_store: ObjectStore, stack_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(monkeypatch, stack_settings, object_store.bucket, tmp_path)
    mask = tmp_path / "mask.png"
    marks = np.zeros((SIZE, SIZE), dtype=bool)
    marks[4:8, 4:8] = True
    mask.write_bytes(encode_png(marks))
    outcome = runner.invoke(app, ["confirm", "cam01-8", "--abnormal", "--mask", str(mask), "--by", "x" * 200])
    assert outcome.exit_code == 2 and "confirmed_by" in outcome.output, outcome.output
    assert list(object_store.list_keys("images/default/masks/")) == []


def test_ingest_once_exits_1_when_it_left_confirmations_pending(
    redis_client: redis.Redis,
    object_store: ObjectStore,
    stack_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A cron job running `ingest --once` must notice a store outage: exit 1, and the next run files them."""
    _kept(object_store, "cam01-7")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam01-7", label="normal"))
    _env(monkeypatch, stack_settings, object_store.bucket, tmp_path)

    def store_away(*_: object, **__: object) -> None:
        raise ConnectionError("store away")

    with monkeypatch.context() as patch:
        patch.setattr(ObjectStore, "put_bytes", store_away)
        outcome = runner.invoke(app, ["confirmations", "ingest", "--once", "--consumer", "t"])
    assert outcome.exit_code == 1, outcome.output
    assert '"retry": 1' in outcome.stdout and "1 confirmations were left pending" in outcome.stderr
    outcome = runner.invoke(app, ["confirmations", "ingest", "--once", "--consumer", "t"])
    assert outcome.exit_code == 0 and '"written": 1' in outcome.stdout, outcome.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cam01-1", "--abnormal", "--box", "1,2,3"], "--box '1,2,3' is not x,y,w,h"),
        (["cam01-1", "--abnormal", "--box", "1,2,0,4"], "width and height must be between 1 and 65535"),
        (["cam01-1", "--normal", "--box", "1,2,3,4"], "give them with --abnormal, not --normal"),
        (["cam01-1", "--abnormal", "--mask", "no/such.png"], "cannot read no/such.png"),
        (["../etc", "--normal"], "invalid job id '../etc'"),
        (["cam01-1", "--normal", "--line", "Line A"], "is not a line id"),
    ],
)
def test_bad_confirm_arguments_exit_2_naming_the_problem(args: list[str], message: str) -> None:
    outcome = runner.invoke(app, ["confirm", *args])
    assert outcome.exit_code == 2
    assert message in outcome.output


def test_a_mask_that_marks_nothing_is_refused(tmp_path: Path) -> None:
    mask = tmp_path / "blank.png"
    mask.write_bytes(encode_png(np.zeros((16, 16), dtype=bool)))
    outcome = runner.invoke(app, ["confirm", "cam01-1", "--abnormal", "--mask", str(mask)])
    assert outcome.exit_code == 2
    assert f"--mask {mask} marks no pixel" in outcome.output


def test_a_mask_or_image_over_the_byte_limit_is_refused_unread(
    redis_client: redis.Redis, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 12_000  # over a kept image (~9 KB), under the noise below (~49 KB)
    monkeypatch.setattr(datasets, "MAX_REFERENCED_IMAGE_BYTES", limit)
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    big = encode_png(noise, compress_level=0)  # a valid SIZE×SIZE mask or image: only its size is wrong
    assert len(big) > limit
    object_store.put_bytes("images/default/masks/big.png", big)
    mask_ref = object_store.ref("images/default/masks/big.png")
    _kept(object_store, "cam03-1")
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam03-1", label="abnormal", mask_ref=mask_ref))
    by_ref = InspectionJob(job_id="cam03-2")  # no kept image: its image_ref is read
    ref = upload_image(object_store, image_key(by_ref), big)
    redis_client.set(
        NAMES.done_marker(by_ref.job_id), publish_job(redis_client, NAMES, by_ref.model_copy(update={"image_ref": ref}))
    )
    publish_confirmation(redis_client, NAMES, Confirmation(job_id="cam03-2", label="normal"))
    assert _ingest(redis_client, object_store) == {"dead": 2}
    letters = _dead(redis_client)
    assert [(letter.job_id, letter.reason) for letter in letters] == [
        ("cam03-1", DeadReason.PAYLOAD_TOO_LARGE),
        ("cam03-2", DeadReason.PAYLOAD_TOO_LARGE),
    ]
    assert letters[0].detail.startswith(f"mask {mask_ref} is ") and f"at most {limit} are allowed" in letters[0].detail
    assert ref in letters[1].detail and f"at most {limit}" in letters[1].detail
    assert _keys(object_store) == set() and _pending(redis_client) == 0
