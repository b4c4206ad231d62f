"""The images the model scored, kept so that operators' confirmations can file them for retraining.

A job's image travels inline in its stream entry (gone once the stream is trimmed) or as an ``s3://``
reference (which a camera's retention may delete). So the consumer keeps each job's image bytes, exactly
as they arrived (PNG, JPEG, TIFF, ...: no decoding or encoding on the scoring path, one PUT), under a
key that only the job's line and id determine::

    images/<line>/scored/<job_id>          # the original bytes; `decode_image` gives what the model saw

Filing a confirmation (`workers.datasets`) decodes them with the same bounded decoder as the consumer
and writes `scored_png`, which is lossless for 8- and 16-bit greyscale sources (the model's float32
input is exactly ``value / 255`` or ``value / 65535``; colour sources, turned into float luminance,
are kept to 1/65535): ``decode_image(scored_png(image))`` gives ``image`` back::

    objects = kept_image_objects(job, payload, keep=True)   # (MapObject("images/default/scored/cam01-7", ...),)
"""

from __future__ import annotations

import numpy as np

from schemas import InspectionJob
from trainer.imaging import encode_png, integer_levels
from workers.maps import MapObject

SCORED_PNG_LEVEL = 1
"""zlib level of filed images (speed over size: the pixels are the same)."""

_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def scored_image_key(line: str, job_id: str) -> str:
    """Where the consumer keeps the image bytes it scored for ``job_id`` on ``line``."""
    return f"images/{line}/scored/{job_id}"


def image_content_type(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their first bytes (``application/octet-stream`` if unknown)."""
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    return "image/bmp" if data.startswith(b"BM") else "application/octet-stream"


def scored_png(image: np.ndarray, compress_level: int = SCORED_PNG_LEVEL) -> bytes:
    """A (H, W) float image in [0, 1] as a lossless PNG: 8-bit when every value is k/255, else 16-bit."""
    return encode_png(integer_levels(image), compress_level)


def kept_image_objects(job: InspectionJob, payload: bytes, keep: bool) -> tuple[MapObject, ...]:
    """The object that keeps a scored job's image bytes as they arrived (none when ``keep`` is off)."""
    if not keep:
        return ()
    return (MapObject(scored_image_key(job.line, job.job_id), payload, image_content_type(payload)),)
