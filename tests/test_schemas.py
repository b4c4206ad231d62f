"""The stream contract: strict validation with messages that name the problem."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas import (
    DeadLetter,
    DeadReason,
    InspectionJob,
    JobRejected,
    StreamNames,
    decode_job_entry,
    encode_job_entry,
    parse_s3_ref,
)
from schemas.envelope import peek_ids, peek_raw_ids
from schemas.stream import MAX_INLINE_IMAGE_BYTES


@pytest.mark.parametrize(
    "job_id", ["../etc/passwd", "a/b", "", "has space", "x" * 200, "-leading-dash", "dot.dot", "ü-umlaut"]
)
def test_schema_rejects_unsafe_job_id(job_id: str) -> None:
    with pytest.raises(ValidationError, match="job_id"):
        InspectionJob(job_id=job_id)


def test_schema_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        InspectionJob.model_validate({"job_id": "cam01-1", "surprise": 1})


@pytest.mark.parametrize(
    "ref",
    [
        "s3://b/../x",
        "s3://bucket/a/../../b",
        "http://bucket/key",
        "s3://bucket/",
        "s3://UPPER/key",
        "s3://bucket/.hidden",
    ],
)
def test_unsafe_image_refs_are_rejected(ref: str) -> None:
    with pytest.raises(ValueError):
        parse_s3_ref(ref)


def test_safe_image_ref_round_trips() -> None:
    ref = parse_s3_ref("s3://anomap/images/line-a/cam01/cam01-000001.png")
    assert (ref.bucket, ref.key) == ("anomap", "images/line-a/cam01/cam01-000001.png")
    assert str(ref) == "s3://anomap/images/line-a/cam01/cam01-000001.png"


def test_inline_entry_round_trips() -> None:
    job = InspectionJob(job_id="cam01-000001", camera_id="cam01")
    decoded, image = decode_job_entry(encode_job_entry(job, b"\x89PNG..."))
    assert decoded == job
    assert image == b"\x89PNG..."


def test_reference_entry_round_trips() -> None:
    job = InspectionJob(job_id="cam01-000002", image_ref="s3://anomap/images/x.png")
    decoded, image = decode_job_entry(encode_job_entry(job))
    assert decoded.image_ref == "s3://anomap/images/x.png"
    assert image is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, DeadReason.INVALID_ENTRY),
        ({b"job": b"{}", b"extra": b"1"}, DeadReason.INVALID_ENTRY),
        ({b"job": b"not json", b"image": b"x"}, DeadReason.INVALID_JSON),
        ({b"job": b'{"camera_id": "cam01"}', b"image": b"x"}, DeadReason.INVALID_SCHEMA),
        ({b"job": json.dumps({"job_id": "../../x"}).encode(), b"image": b"x"}, DeadReason.INVALID_SCHEMA),
        ({b"job": b'{"job_id": "j1"}'}, DeadReason.MISSING_IMAGE),
        ({b"job": b'{"job_id": "j1", "image_ref": "s3://anomap/a.png"}', b"image": b"x"}, DeadReason.AMBIGUOUS_IMAGE),
        ({b"job": b'{"job_id": "j1"}', b"image": b""}, DeadReason.EMPTY_IMAGE),
        ({b"job": b'{"job_id": "j1"}', b"image": b"x" * (MAX_INLINE_IMAGE_BYTES + 1)}, DeadReason.PAYLOAD_TOO_LARGE),
        ({b"job": b"x" * 20000}, DeadReason.PAYLOAD_TOO_LARGE),
        ({b"job": b"[" * 5000, b"image": b"x"}, DeadReason.INVALID_JSON),  # json.loads: RecursionError
        ({b"job": b'{"job_id": "j1", "camera_id": ' + b"[" * 3000 + b"]" * 3000 + b"}"}, DeadReason.INVALID_JSON),
        ({b"job": b"\xff\xfe{}", b"image": b"x"}, DeadReason.INVALID_JSON),
    ],
)
def test_bad_entries_are_rejected_with_a_reason(fields: dict[bytes, bytes], reason: DeadReason) -> None:
    with pytest.raises(JobRejected) as caught:
        decode_job_entry(fields)
    assert caught.value.reason is reason
    assert caught.value.detail


def test_schema_violation_keeps_the_job_id_for_the_dead_letter() -> None:
    with pytest.raises(JobRejected) as caught:
        decode_job_entry({b"job": b'{"job_id": "cam01-7", "line": "NOT VALID"}', b"image": b"x"})
    assert caught.value.job_id == "cam01-7"
    assert "line" in caught.value.detail


def test_a_job_id_no_text_can_carry_is_kept_escaped_for_the_dead_letter() -> None:
    with pytest.raises(JobRejected) as caught:  # a lone surrogate, and a newline that would forge log lines
        decode_job_entry({b"job": b'{"job_id": "cam\\ud800\\nx"}', b"image": b"x"})
    assert caught.value.reason is DeadReason.INVALID_SCHEMA
    assert caught.value.job_id == "cam\\ud800\\nx"  # escaped: printable, and UTF-8 can carry it
    DeadLetter(
        entry_id="1-0", stream="s", job_id=caught.value.job_id, reason=caught.value.reason, detail="d", delivery_count=1
    )


def test_peeked_ids_are_printable_and_lines_valid() -> None:
    assert peek_raw_ids(b'{"job_id": "cam01-1", "line": "press-2"}') == ("cam01-1", "press-2")
    assert peek_raw_ids(b'{"job_id": "x" , "line": "../etc"}') == ("x", None)
    assert peek_raw_ids(b'{"job_id": ' + b"[" * 5000) == (None, None)
    assert peek_raw_ids(b"[1, 2]") == (None, None)
    assert peek_raw_ids(None) == (None, None)
    assert peek_ids({"job_id": "a" * 300})[0] == "a" * 128


@pytest.mark.parametrize("threshold", [0.0, 1e-308, 1e-7, 2e6])
def test_pixel_threshold_outside_its_range_is_refused(threshold: float) -> None:
    with pytest.raises(ValidationError, match="pixel_threshold"):
        InspectionJob(job_id="j1", pixel_threshold=threshold)


def test_stream_names_per_line() -> None:
    names = StreamNames("anomap")
    assert names.jobs() == "anomap:jobs"
    assert names.jobs("line-a") == "anomap:jobs:line-a"
    assert names.results("line-a") == "anomap:results:line-a"
    assert names.dead == "anomap:dead"
