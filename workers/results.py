"""Reading what the consumers wrote: results and dead letters.

for entry_id, result in read_results(client, names, line="default", start="-"):
    print(result.job_id, result.image_score)
"""

from __future__ import annotations

from collections.abc import Iterator

import redis

from schemas import DeadLetter, InspectionResult, StreamNames


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


def follow_results(
    client: redis.Redis, names: StreamNames, line: str | None = None, last_id: str = "$", block_ms: int = 1000
) -> Iterator[tuple[str, InspectionResult]]:
    """New results as they arrive (blocking); ``last_id="$"`` starts from now."""
    stream = names.results(line)
    while True:
        reply = client.xread({stream: last_id}, block=block_ms, count=100)
        for _, items in reply or []:
            for entry_id, fields in items:
                last_id = entry_id.decode()
                yield last_id, InspectionResult.model_validate_json(fields[b"result"])
