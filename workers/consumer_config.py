"""What a `StreamConsumer` is configured with and what it reports: `ConsumerConfig`, `Outcome`, `ConsumerStats`.

Example::

    config = ConsumerConfig(consumer="host-4711-0", lines=("default", "press-2"), max_in_flight=2)
    stats = StreamConsumer(redis, store, inspector, names, config).run(stop)   # counts per Outcome
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

from schemas.settings import Settings
from schemas.stream import MAX_REFERENCED_IMAGE_BYTES

REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError,  # includes BusyLoadingError: a restarted server still loading its AOF
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # talking to a replica during a failover
)
"""Redis errors that mean "the server is away for now", not "this request is wrong"."""


class Outcome(StrEnum):
    """What happened to one delivered entry."""

    RESULT = "result"
    DUPLICATE = "duplicate"
    """Already had a result (redelivery): acknowledged without scoring again."""
    DEAD = "dead"
    RETRY = "retry"
    """Left pending; it will be reclaimed and tried again."""


@dataclass(frozen=True)
class ConsumerConfig:
    """How one consumer reads, retries and trims."""

    consumer: str
    lines: tuple[str, ...] = ("default",)
    max_in_flight: int = 4
    block_ms: int = 500
    claim_idle_ms: int = 60_000
    claim_every_s: float = 5.0
    max_deliveries: int = 5
    results_maxlen: int = 100_000
    dead_maxlen: int = 100_000
    done_ttl_s: int = 7 * 24 * 3600
    progress_ttl_s: int = 6 * 3600
    """How long a job's owner marker (a second entry with its ``job_id`` is turned away meanwhile) and an
    entry's last failure are kept: well above the time a job can stay in progress (five deliveries of
    ``claim_idle_ms`` plus retries are ~20 minutes)."""
    store_retry_s: float = 120.0
    """How long one job waits out an unreachable object store before its entry is left pending."""
    redis_retry_s: float = 120.0
    """How long one job waits out an unreachable Redis before its entry is left pending."""
    score_retry_s: float = 30.0
    """How long one job retries a failing Serve call (a replica died, say) before it is left pending."""
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    backoff_jitter: float = 0.5
    """Each retry wait d is drawn from [(1 - jitter)·d, d], so refused consumers do not return in step."""
    busy_backoff_max_s: float = 1.0
    """Longest wait before a job that Serve refused for backpressure is sent again."""
    drain_timeout_s: float = 60.0
    """After ``stop``: how long jobs in flight may take before their retry waits are cut short."""
    backlog_every_s: float = 5.0
    """How often the group's lag and pending count are sampled for the metrics (only where Ray runs)."""
    max_image_ref_bytes: int = MAX_REFERENCED_IMAGE_BYTES
    """The largest object an ``image_ref`` may name; a larger one is a ``payload_too_large`` dead letter."""
    keep_images: bool = True
    """Keep each scored job's image bytes (``images/<line>/scored/<job_id>``) for confirmations to file."""
    forget_idle_ms: int = 3_600_000
    """Group members holding nothing and idle this long are deleted (crashed processes); 0: never."""
    forget_every_s: float = 60.0

    @classmethod
    def for_service(cls, settings: Settings, consumer: str, lines: tuple[str, ...], **options: Any) -> ConsumerConfig:
        """A consumer of the service (`anomap serve`, the ``anomap-consumers`` app): what ``settings`` say
        (``ANOMAP_DONE_TTL_S``), then ``options`` (``max_in_flight``, ``claim_idle_ms``, ...)."""
        return cls(consumer=consumer, lines=lines, done_ttl_s=settings.done_ttl_s, **options)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            msg = f"max_in_flight must be >= 1, got {self.max_in_flight}"
            raise ValueError(msg)
        if self.claim_idle_ms < 1:
            msg = f"claim_idle_ms must be >= 1, got {self.claim_idle_ms}"
            raise ValueError(msg)
        if self.progress_ttl_s < 1 or self.done_ttl_s < 1:
            msg = f"progress_ttl_s and done_ttl_s must be >= 1, got {self.progress_ttl_s} and {self.done_ttl_s}"
            raise ValueError(msg)
        if self.forget_idle_ms < 0:
            msg = f"forget_idle_ms must be >= 0 (0: never), got {self.forget_idle_ms}"
            raise ValueError(msg)
        if not 0 < self.backoff_initial_s <= min(self.backoff_max_s, self.busy_backoff_max_s):
            msg = (
                "need 0 < backoff_initial_s <= backoff_max_s and busy_backoff_max_s, got "
                f"backoff_initial_s={self.backoff_initial_s} backoff_max_s={self.backoff_max_s} "
                f"busy_backoff_max_s={self.busy_backoff_max_s}"
            )
            raise ValueError(msg)
        if not 0 <= self.backoff_jitter <= 1:
            msg = f"backoff_jitter must be in [0, 1], got {self.backoff_jitter}"
            raise ValueError(msg)


@dataclass
class ConsumerStats:
    """Counts of outcomes since the consumer started, and of Serve's refusals for backpressure."""

    outcomes: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    backpressure: int = 0
    """Times Serve refused a job because its queue was full (each such job waited and was sent again)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, outcome: Outcome) -> None:
        """Count one outcome."""
        self.outcomes[outcome] += 1

    def add_backpressure(self) -> None:
        """Count one refusal for backpressure (called from job threads)."""
        with self._lock:
            self.backpressure += 1
