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

import logging
import threading
import uuid
from datetime import UTC, datetime

import redis
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas import StreamNames
from schemas.model_card import RetrainDecision
from trainer.registry import ModelRegistry
from trainer.store import ObjectMissing

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 100
"""Attempts kept per line (the oldest are dropped)."""
LOCK_TTL_S = 600
"""A crashed run's lock expires after this long; a running one renews it every third of it, however long it trains."""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"


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


class LineLock:
    """``SET NX EX`` on ``<prefix>:retrain:lock:<line>``, renewed by a thread while held (a fine-tune may outlast
    ``ttl_s``), released only by its holder (a Lua compare-and-delete)."""

    def __init__(self, client: redis.Redis, names: StreamNames, line: str, ttl_s: int = LOCK_TTL_S) -> None:
        self.client = client
        self.key = f"{names.prefix}:retrain:lock:{line}"
        self.ttl_s = ttl_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock and start renewing it; False when another run holds it."""
        if not self.client.set(self.key, self.token, nx=True, ex=self.ttl_s):
            return False
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"renew {self.key}", daemon=True)
        self._renewer.start()
        return True

    def _renew(self) -> None:
        """Every third of ``ttl_s``, push the expiry back while this holder still has the lock."""
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_s):
                    log.warning("lost %s (it expired and another run may hold it)", self.key)
                    return
            except redis.RedisError as exc:  # Redis away for a moment: the next renewal tries again
                log.warning("could not renew %s: %r", self.key, exc)

    def release(self) -> None:
        """Stop renewing and give the lock back (a no-op when it expired and someone else took it)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        self.client.eval(_RELEASE, 1, self.key, self.token)
