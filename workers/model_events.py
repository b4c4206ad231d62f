"""Promotions and rollbacks of live models, announced on ``anomap:models``.

    event = promote_model(registry, client, names, "v20261130-101500-000000", line="press-2", reason="retrained")
    event = rollback_model(registry, client, names, line="press-2", reason="false alarms")
    for entry_id, event in read_model_events(client, names): ...

Redis is pinged before anything moves, so an unreachable Redis moves nothing. Then the registry's
pointer moves (it is what the Serve app reads) and the event is added to the stream; a move that
changes nothing (promoting the version already live) adds no event. If adding the event fails after
the pointer moved, `ModelEventNotAnnounced` says so and carries the event: serving follows the pointer
anyway, and a retry would move it again.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis

from schemas import MODEL_EVENT_FIELD, ModelEvent, StreamNames
from trainer.registry import ModelRegistry

MODELS_MAXLEN = 10_000


class ModelEventNotAnnounced(RuntimeError):
    """The pointer moved (``event``) but adding the event to ``anomap:models`` failed."""

    def __init__(self, event: ModelEvent, cause: Exception) -> None:
        moved = f"{event.previous or 'the default line'} → {event.version or 'the default line'}"
        super().__init__(
            f"model {event.name} on line {event.line} moved ({moved}), but the event could not be added to "
            f"anomap:models ({type(cause).__name__}: {cause}); serving follows the pointer all the same. "
            "Do not repeat the command: it would move the pointer again"
        )
        self.event = event


def _announce(client: redis.Redis, names: StreamNames, event: ModelEvent) -> None:
    try:
        publish_model_event(client, names, event)
    except redis.RedisError as exc:
        raise ModelEventNotAnnounced(event, exc) from exc


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
    """Make ``version`` live on ``line`` and announce it (see `ModelRegistry.promote`).

    Raises redis.ConnectionError (nothing moved) when Redis does not answer first, and
    `ModelEventNotAnnounced` when the pointer moved but the event could not be added.
    """
    client.ping()
    event = registry.promote(version, line, reason)
    if event.changed:
        _announce(client, names, event)
    return event


def rollback_model(
    registry: ModelRegistry, client: redis.Redis, names: StreamNames, line: str | None = None, reason: str = ""
) -> ModelEvent:
    """Point ``line`` back at its previously live version and announce it (see `ModelRegistry.rollback`).

    Fails as `promote_model` does.
    """
    client.ping()
    event = registry.rollback(line, reason)
    _announce(client, names, event)
    return event
