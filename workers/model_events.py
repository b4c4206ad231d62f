"""Promotions and rollbacks of live models, announced on ``anomap:models``.

    event = promote_model(registry, client, names, "v20261130-101500-000000", line="press-2", reason="retrained")
    event = rollback_model(registry, client, names, line="press-2", reason="false alarms")
    for entry_id, event in read_model_events(client, names): ...

The registry's pointer moves first (it is what the Serve app reads), then the event is added to the
stream; a move that changes nothing (promoting the version already live) adds no event.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis

from schemas import MODEL_EVENT_FIELD, ModelEvent, StreamNames
from trainer.registry import ModelRegistry

MODELS_MAXLEN = 10_000


def publish_model_event(client: redis.Redis, names: StreamNames, event: ModelEvent) -> str:
    """Add ``event`` to ``anomap:models``; returns the entry id."""
    entry_id = client.xadd(
        names.models, {MODEL_EVENT_FIELD: event.model_dump_json().encode()}, maxlen=MODELS_MAXLEN, approximate=True
    )
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def read_model_events(client: redis.Redis, names: StreamNames, start: str = "-") -> Iterator[tuple[str, ModelEvent]]:
    """Events on ``anomap:models`` from ``start`` (inclusive), oldest first."""
    for entry_id, fields in client.xrange(names.models, min=start):
        yield entry_id.decode(), ModelEvent.model_validate_json(fields[MODEL_EVENT_FIELD])


def promote_model(
    registry: ModelRegistry,
    client: redis.Redis,
    names: StreamNames,
    version: str,
    line: str | None = None,
    reason: str = "",
) -> ModelEvent:
    """Make ``version`` live on ``line`` and announce it (see `ModelRegistry.promote`)."""
    event = registry.promote(version, line, reason)
    if event.changed:
        publish_model_event(client, names, event)
    return event


def rollback_model(
    registry: ModelRegistry, client: redis.Redis, names: StreamNames, line: str | None = None, reason: str = ""
) -> ModelEvent:
    """Point ``line`` back at its previously live version and announce it (see `ModelRegistry.rollback`)."""
    event = registry.rollback(line, reason)
    publish_model_event(client, names, event)
    return event
