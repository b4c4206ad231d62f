"""Promotions and rollbacks of live models, announced on ``anomap:models``.

    event = promote_model(registry, client, names, "v20261130-101500-000000", line="press-2", reason="retrained")
    event = rollback_model(registry, client, names, line="press-2", reason="false alarms")
    for entry_id, event in read_model_events(client, names): ...

Redis is pinged before anything moves, so an unreachable Redis moves nothing. Then the registry's
pointer moves (it is what the Serve app reads) and the event is added to the stream; a move that
changes nothing (promoting the version already live) adds no event. If adding the event fails after
the pointer moved, `ModelEventNotAnnounced` says so and carries the event: serving follows the pointer
anyway, and a retry would move it again.

The pointers live in the object store, which has no compare-and-set, so every move of a model's pointers
holds that model's pointer lock in Redis (``<prefix>:models:lock:<name>``, `moving_pointers`): an
operator's promotion and a retraining run's cannot interleave their reads and writes, and a run that
checks "is the live version still my parent?" under the lock knows the answer holds until it has moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from schemas import MODEL_EVENT_FIELD, ModelEvent, StreamNames
from trainer.registry import ModelRegistry
from workers.redis_lock import RenewedLock

MODELS_MAXLEN = 10_000
POINTER_LOCK_TTL_S = 30
"""A crashed mover's pointer lock expires after this long; a live one renews it (a move checks the version's
weights first: seconds)."""
POINTER_LOCK_WAIT_S = 60.0
"""How long a move waits for another move of the same model's pointers before `PointersBusy`."""


class PointersBusy(RuntimeError):
    """Another promotion or rollback of the same model held its pointer lock for longer than the wait."""


def pointer_lock_key(names: StreamNames, model: str) -> str:
    """The Redis key of ``model``'s pointer lock: ``<prefix>:models:lock:<model>``."""
    return f"{names.prefix}:models:lock:{model}"


@contextmanager
def moving_pointers(client: redis.Redis, names: StreamNames, model: str, wait_s: float | None = None) -> Iterator[None]:
    """Hold ``model``'s pointer lock for the block: the one move of its live pointers at a time.

    Raises `PointersBusy` (nothing held) when another move kept it for ``wait_s`` seconds (default
    `POINTER_LOCK_WAIT_S`).
    """
    wait_s = POINTER_LOCK_WAIT_S if wait_s is None else wait_s
    lock = RenewedLock(client, pointer_lock_key(names, model), POINTER_LOCK_TTL_S * 1000)
    if not lock.acquire(wait_s=wait_s):
        msg = (
            f"another promotion or rollback of model {model} held its pointer lock ({lock.key}) for over "
            f"{wait_s:.0f} s, so nothing was moved"
        )
        raise PointersBusy(msg)
    try:
        yield
    finally:
        lock.release()


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

    Raises redis.ConnectionError (nothing moved) when Redis does not answer first, `PointersBusy` (nothing
    moved) when another move holds the model's pointer lock too long, and `ModelEventNotAnnounced` when the
    pointer moved but the event could not be added.
    """
    client.ping()
    with moving_pointers(client, names, registry.name):
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
    with moving_pointers(client, names, registry.name):
        event = registry.rollback(line, reason)
    _announce(client, names, event)
    return event
