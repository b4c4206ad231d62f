"""Results: building one from a scored job, and reading what the consumers wrote.

for entry_id, result in read_results(client, names, line="default", start="-"):
    print(result.job_id, result.image_score)
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import redis

from schemas import DeadLetter, InspectionJob, InspectionResult, StreamNames
from workers.inspection import ScoredImage


def build_result(
    job: InspectionJob, scored: ScoredImage, map_ref: str, overlay_ref: str, stage_ms: dict[str, float]
) -> InspectionResult:
    """The `InspectionResult` of a scored job whose map and overlay are stored at the given refs."""
    summary = scored.summary
    now = datetime.now(UTC)
    return InspectionResult(
        job_id=job.job_id,
        camera_id=job.camera_id,
        line=job.line,
        model_version=scored.model_version,
        width=scored.anomaly_map.shape[1],
        height=scored.anomaly_map.shape[0],
        image_score=summary.image_score,
        raw_image_score=summary.raw_image_score,
        is_anomalous=summary.is_anomalous,
        pixel_threshold=scored.pixel_threshold,
        image_threshold=scored.image_threshold,
        regions=summary.regions,
        regions_truncated=summary.regions_truncated,
        map_ref=map_ref,
        overlay_ref=overlay_ref,
        captured_at=job.captured_at,
        published_at=job.published_at,
        scored_at=now,
        latency_ms=max((now - job.published_at).total_seconds() * 1e3, 0.0),
        stage_ms=stage_ms,
    )


def read_results(
    client: redis.Redis, names: StreamNames, line: str | None = None, start: str = "-", count: int | None = None
) -> Iterator[tuple[str, InspectionResult]]:
    """Results on a line's results stream from ``start`` (inclusive), oldest first."""
    for entry_id, fields in client.xrange(names.results(line), min=start, count=count):
        yield entry_id.decode(), InspectionResult.model_validate_json(fields[b"result"])


def read_dead_letters(client: redis.Redis, names: StreamNames, start: str = "-") -> Iterator[tuple[str, DeadLetter]]:
    """Dead letters from ``start`` (inclusive), oldest first."""
    for entry_id, fields in client.xrange(names.dead, min=start):
        yield entry_id.decode(), DeadLetter.model_validate_json(fields[b"dead"])


def follow_entries(
    client: redis.Redis, stream: str, last_id: str = "$", block_ms: int = 1000
) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    """Raw entries ``(id, fields)`` of ``stream`` after ``last_id``, as they arrive (blocking, endless).

    Pass the id of the last entry already read, so nothing written in between is missed; ``"$"``
    starts from now, ``"0-0"`` from the beginning.
    """
    while True:
        reply = client.xread({stream: last_id}, block=block_ms, count=100)
        for _, items in reply or []:
            for entry_id, fields in items:
                last_id = entry_id.decode()
                yield last_id, fields


def read_answer(is_dead: bool, fields: dict[bytes, bytes]) -> DeadLetter | InspectionResult:
    """A results-stream entry's `InspectionResult`, or a dead-letter entry's `DeadLetter`.

    Raises ValueError naming what is wrong when the entry is not one (another writer's, or a newer
    version's with a reason this one does not know).
    """
    field, model = (b"dead", DeadLetter) if is_dead else (b"result", InspectionResult)
    raw = fields.get(field)
    if raw is None:
        msg = f"entry has no {field.decode()!r} field"
        raise ValueError(msg)
    return model.model_validate_json(raw)
