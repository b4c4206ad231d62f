"""Capped exponential backoff for calls to servers that may be briefly away (Redis, the object store).

    delays = Backoff(initial_s=0.1, max_s=5.0)             # 0.1, 0.2, 0.4, … 5.0, 5.0, …
    data = retry_call(lambda: store.get_bytes(key), transient=(OSError,), limit_s=120, abort=event,
                      what="reading the image")

`retry_call` keeps calling while the call raises one of ``transient`` and the time limit allows,
waiting on ``abort`` between attempts (so a draining consumer can cut the waits short); the last
error is raised when it gives up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger("anomap.retry")
T = TypeVar("T")


@dataclass
class Backoff:
    """Delays that double from ``initial_s`` up to ``max_s``; `reset` after a success."""

    initial_s: float = 0.1
    max_s: float = 5.0
    _next: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            msg = f"need 0 < initial_s <= max_s, got initial_s={self.initial_s} max_s={self.max_s}"
            raise ValueError(msg)
        self._next = self.initial_s

    def next_delay(self) -> float:
        """The delay to wait now; the following one is twice as long (capped)."""
        delay = self._next
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
) -> T:
    """``op()``, retried with backoff while it raises ``transient`` (but not ``permanent``) errors.

    Gives up, re-raising the last error, when the next wait would pass ``limit_s`` seconds from the
    first attempt or when ``abort`` is set.
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
                log.warning("%s failed after %d attempt(s), giving up: %r", what, attempt, exc)
                raise
            if attempt == 1 or attempt % 5 == 0:
                log.warning("%s failed (attempt %d), retrying in %.1fs: %r", what, attempt, delay, exc)
            abort.wait(delay)
            attempt += 1
