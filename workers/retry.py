"""Capped exponential backoff for calls to servers that may be briefly away (Redis, the object store),
and the intake limit a consumer shrinks while Serve pushes back.

    delays = Backoff(initial_s=0.1, max_s=5.0)             # 0.1, 0.2, 0.4, … 5.0, 5.0, …
    delays = Backoff(0.1, 5.0, jitter=0.5)                 # each in [d/2, d]: callers spread out
    data = retry_call(lambda: store.get_bytes(key), transient=(OSError,), limit_s=120, abort=event,
                      what="reading the image")

`retry_call` keeps calling while the call raises one of ``transient`` and the time limit allows,
waiting on ``abort`` between attempts (so a draining consumer can cut the waits short); the last
error is raised when it gives up.

`IntakeLimit` is additive-increase / multiplicative-decrease: halved (down to 1) each time Serve
refuses a job for backpressure, one higher each time Serve takes and scores one:

    limit = IntakeLimit(maximum=4)    # 4
    limit.refused()                   # 2
    limit.refused()                   # 1
    limit.accepted()                  # 2
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger("anomap.retry")
T = TypeVar("T")


@dataclass
class Backoff:
    """Delays that double from ``initial_s`` up to ``max_s``; `reset` after a success.

    With ``jitter`` j in [0, 1], each delay d is drawn uniformly from [(1 - j)·d, d], so callers that
    were refused together do not all come back at the same moment.
    """

    initial_s: float = 0.1
    max_s: float = 5.0
    jitter: float = 0.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    _next: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            msg = f"need 0 < initial_s <= max_s, got initial_s={self.initial_s} max_s={self.max_s}"
            raise ValueError(msg)
        if not 0 <= self.jitter <= 1:
            msg = f"jitter must be in [0, 1], got {self.jitter}"
            raise ValueError(msg)
        self._next = self.initial_s

    def next_delay(self) -> float:
        """The delay to wait now (jittered); the following one is twice as long (capped at ``max_s``)."""
        delay = self._next * (1 - self.jitter * self.rng.random())
        self._next = min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        """Start again from ``initial_s``."""
        self._next = self.initial_s


def retry_call(
    op: Callable[[], T],
    *,
    transient: tuple[type[BaseException], ...],
    limit_s: float,
    abort: threading.Event,
    what: str,
    backoff: Backoff | None = None,
    permanent: tuple[type[BaseException], ...] = (),
    log_fields: Mapping[str, object] | None = None,
) -> T:
    """``op()``, retried with backoff while it raises ``transient`` (but not ``permanent``) errors.

    Gives up, re-raising the last error, when the next wait would pass ``limit_s`` seconds from the
    first attempt or when ``abort`` is set. ``log_fields`` go on the log records of the retries
    (``extra``: a job's id and line, say).
    """
    backoff = backoff or Backoff()
    deadline = time.monotonic() + limit_s
    attempt = 1
    while True:
        try:
            return op()
        except permanent:
            raise
        except transient as exc:
            delay = backoff.next_delay()
            if abort.is_set() or time.monotonic() + delay > deadline:
                log.warning("%s failed after %d attempt(s), giving up: %r", what, attempt, exc, extra=log_fields)
                raise
            if attempt == 1 or attempt % 5 == 0:
                log.warning(
                    "%s failed (attempt %d), retrying in %.1fs: %r", what, attempt, delay, exc, extra=log_fields
                )
            abort.wait(delay)
            attempt += 1


class IntakeLimit:
    """How many jobs a consumer may hold now: between 1 and ``maximum``, shrunk by backpressure.

    Thread-safe: jobs report from their own threads, the read loop asks `current`.
    """

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            msg = f"maximum must be >= 1, got {maximum}"
            raise ValueError(msg)
        self.maximum = maximum
        self._limit = maximum
        self._lock = threading.Lock()

    @property
    def current(self) -> int:
        """The limit now."""
        with self._lock:
            return self._limit

    def refused(self) -> None:
        """A job was refused for backpressure: halve the limit (at least 1)."""
        with self._lock:
            self._limit = max(1, self._limit // 2)

    def accepted(self) -> None:
        """Serve took and scored a job: raise the limit by one (at most ``maximum``)."""
        with self._lock:
            self._limit = min(self.maximum, self._limit + 1)
