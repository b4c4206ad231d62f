"""What the retraining controller remembers between runs, and the lock that keeps one run per line.

    retrain/<model>/<line>/state.json     RetrainState: the latest attempts (parent, confirmations digest,
                                          candidate, decision), oldest first

    state = load_state(registry, "press-2")
    state.tried("v1", digest)            # RetrainAttempt(candidate="v2", decision="rejected") or None
    record_attempt(registry, "press-2", RetrainAttempt(parent="v1", confirmations_digest=digest, ...))

    lock = LineLock(client, names, "press-2")    # SET NX EX on "<prefix>:retrain:lock:press-2"
    if lock.acquire(): ...; lock.release()       # renewed while held, released only by its holder;
                                                 # expires LOCK_TTL_S after a crash

Which confirmations a version was trained on is in its card (``retraining.confirmations``); the
state only keeps a parent from being fine-tuned again and again on data that was already tried.
"""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas import StreamNames
from schemas.model_card import RetrainDecision
from trainer.registry import ModelRegistry
from trainer.store import ObjectMissing
from workers.redis_lock import RenewedLock

MAX_ATTEMPTS = 100
"""Attempts kept per line (the oldest are dropped)."""
LOCK_TTL_S = 600
"""A crashed run's lock expires after this long; a running one renews it every third of it, however long it trains."""


class RetrainAttempt(BaseModel):
    """One fine-tune of ``parent`` on the confirmations with ``confirmations_digest``, and how it ended."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parent: str
    confirmations_digest: str
    candidate: str | None = None
    decision: RetrainDecision
    at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))


class RetrainState(BaseModel):
    """``retrain/<model>/<line>/state.json``: the latest attempts (at most `MAX_ATTEMPTS`), oldest first."""

    model_config = ConfigDict(extra="forbid")

    attempts: list[RetrainAttempt] = Field(default_factory=list)

    def tried(self, parent: str, digest: str) -> RetrainAttempt | None:
        """The last attempt on ``parent`` with these confirmations that ended promoted or rejected, if any."""
        for attempt in reversed(self.attempts):
            same = (attempt.parent, attempt.confirmations_digest) == (parent, digest)
            if same and attempt.decision is not RetrainDecision.FAILED:
                return attempt
        return None


def state_key(registry: ModelRegistry, line: str) -> str:
    """``retrain/<model>/<line>/state.json``."""
    return f"retrain/{registry.name}/{line}/state.json"


def load_state(registry: ModelRegistry, line: str) -> RetrainState:
    """The line's retraining state (empty when none was written yet)."""
    try:
        return RetrainState.model_validate_json(registry.store.get_bytes(state_key(registry, line)))
    except ObjectMissing:
        return RetrainState()


def record_attempt(registry: ModelRegistry, line: str, attempt: RetrainAttempt) -> None:
    """Append ``attempt`` to the line's state (read, extend, write: one controller per line holds the lock)."""
    state = load_state(registry, line)
    state.attempts = [*state.attempts, attempt][-MAX_ATTEMPTS:]
    registry.store.put_bytes(state_key(registry, line), state.model_dump_json(indent=1).encode(), "application/json")


class LineLock(RenewedLock):
    """``SET NX PX`` on ``<prefix>:retrain:lock:<line>``, renewed while held (a fine-tune may outlast ``ttl_s``),
    released only by its holder (`workers.redis_lock.RenewedLock`)."""

    def __init__(self, client: redis.Redis, names: StreamNames, line: str, ttl_s: int = LOCK_TTL_S) -> None:
        super().__init__(client, f"{names.prefix}:retrain:lock:{line}", ttl_s * 1000)
