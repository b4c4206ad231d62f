"""Identifiers that end up inside object keys and stream names, and `s3://` references.

A `job_id` becomes part of an object key (``maps/<line>/<yyyy>/<mm>/<dd>/<job_id>.npz``), so it is
limited to letters, digits, ``_`` and ``-`` (no dots, slashes or spaces): ``cam03-000123`` is valid,
``../etc/passwd`` is not.
"""

from __future__ import annotations

import re
from typing import Annotated, NamedTuple

from pydantic import AfterValidator, StringConstraints

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
LINE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
CAMERA_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MODEL_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]{0,254}$")
MAX_KEY_LENGTH = 1024

JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
LineId = Annotated[str, StringConstraints(pattern=LINE_PATTERN)]
CameraId = Annotated[str, StringConstraints(pattern=CAMERA_PATTERN)]
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
ModelVersion = Annotated[str, StringConstraints(pattern=MODEL_VERSION_PATTERN)]


class S3Ref(NamedTuple):
    """A parsed ``s3://bucket/key`` reference."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_ref(ref: str) -> S3Ref:
    """Parse and validate ``s3://bucket/key``.

    Keys are made of ``/``-separated segments of letters, digits and ``_ . = -``; a segment may not
    start with a dot, so ``..`` (path traversal) and hidden names are rejected.

    >>> parse_s3_ref("s3://images/line-a/2026/cam01-0001.png")
    S3Ref(bucket='images', key='line-a/2026/cam01-0001.png')
    """
    if not ref.startswith("s3://"):
        msg = f"expected an s3://bucket/key reference, got {ref[:80]!r}"
        raise ValueError(msg)
    rest = ref[len("s3://") :]
    bucket, sep, key = rest.partition("/")
    if not re.fullmatch(BUCKET_PATTERN, bucket):
        msg = f"invalid bucket name {bucket[:80]!r} in {ref[:120]!r}"
        raise ValueError(msg)
    if not sep or not key:
        msg = f"s3 reference {ref[:120]!r} has no object key"
        raise ValueError(msg)
    if len(key) > MAX_KEY_LENGTH:
        msg = f"object key is {len(key)} characters long; at most {MAX_KEY_LENGTH} are allowed"
        raise ValueError(msg)
    for segment in key.split("/"):
        if not _KEY_SEGMENT.fullmatch(segment):
            msg = (
                f"unsafe object key segment {segment[:80]!r} in {ref[:120]!r}: segments are letters, "
                "digits and _ . = -, not starting with a dot"
            )
            raise ValueError(msg)
    return S3Ref(bucket, key)


def _check_s3_ref(ref: str) -> str:
    parse_s3_ref(ref)
    return ref


S3RefStr = Annotated[str, StringConstraints(max_length=MAX_KEY_LENGTH + 80), AfterValidator(_check_s3_ref)]
