"""Which model version scores a line's images now: the registry's live pointers, read at most every few seconds.

The Serve ingress resolves a version once per image, at the start, and sends it with every patch range,
so an image is scored by one version from start to finish; a promotion (`ModelRegistry.promote`) is
picked up by the next image of that line within ``refresh_s``::

    live = LiveVersions(registry.live_version, refresh_s=2.0)
    version = await live.version("line-7")   # "v20261130-…"; the line's pointer, else the default one

``on_change(line, old, new)`` is called when a line's version changes (the service retires the old
version's ``anomap_model_info`` gauge when no line uses it any more).

When the object store cannot be reached, the last version read keeps serving (and a warning is logged)
rather than failing jobs; a line never resolved before gets the error.

Lines come from jobs, so any name that passes the line pattern makes an entry: at most ``max_lines``
(`DEFAULT_MAX_LINES`) are kept, and the least recently used one is forgotten for a new one (it is read
again when it comes back).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 2.0
"""How stale a line's live version may be: a promotion reaches the service within this many seconds."""
DEFAULT_MAX_LINES = 1024
"""Lines whose live version is cached (with a lock each): far more than a plant runs, few enough that a
stream of made-up line names costs well under 1 MB rather than growing until the replica runs out."""


@dataclass
class _Entry:
    version: str
    read_at: float


@dataclass
class _Line:
    """One line's cached version (None until first read) and the lock that lets one refresh run at a time."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    entry: _Entry | None = None


class LiveVersions:
    """A per-line cache of the live model version, refreshed through ``resolve(line)`` (a blocking call).

    ``resolve`` is `ModelRegistry.live_version` in the service; it runs in a worker thread so that the
    event loop keeps serving while the object store answers. One refresh per line runs at a time. At most
    ``max_lines`` lines are kept, least recently used first out (a line being refreshed is never dropped).
    """

    def __init__(
        self,
        resolve: Callable[[str], str],
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str, str], None] | None = None,
        max_lines: int = DEFAULT_MAX_LINES,
    ) -> None:
        if refresh_s < 0:
            msg = f"refresh_s must be >= 0, got {refresh_s}"
            raise ValueError(msg)
        if max_lines < 1:
            msg = f"max_lines must be >= 1, got {max_lines}"
            raise ValueError(msg)
        self._resolve = resolve
        self.refresh_s = refresh_s
        self.max_lines = max_lines
        self._clock = clock
        self._on_change = on_change
        self._lines: OrderedDict[str, _Line] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        """Lines cached now: at most ``max_lines``, plus any being refreshed when the limit was reached."""
        return len(self._lines)

    def _line(self, line: str) -> _Line:
        """``line``'s state, made most recently used; a new line pushes out the least recently used idle ones."""
        state = self._lines.get(line)
        if state is None:
            state = self._lines[line] = _Line()
            idle = (name for name, other in self._lines.items() if not other.lock.locked() and other is not state)
            for name in list(itertools.islice(idle, max(0, len(self._lines) - self.max_lines))):
                del self._lines[name]
        self._lines.move_to_end(line)
        return state

    def _fresh(self, state: _Line) -> str | None:
        entry = state.entry
        if entry is not None and self._clock() - entry.read_at < self.refresh_s:
            return entry.version
        return None

    async def version(self, line: str) -> str:
        """The live version of ``line``, at most ``refresh_s`` old.

        Raises what ``resolve`` raises (e.g. `ModelNotFound`) only when no version was ever read for ``line``.
        """
        state = self._line(line)
        fresh = self._fresh(state)
        if fresh is not None:
            return fresh
        async with state.lock:
            fresh = self._fresh(state)  # another request refreshed it while this one waited
            if fresh is not None:
                return fresh
            previous = state.entry
            try:
                version = await asyncio.to_thread(self._resolve, line)
            except Exception as exc:
                if previous is None:
                    raise
                log.warning("cannot read the live model of line %r (%s); still serving %s", line, exc, previous.version)
                previous.read_at = self._clock()  # try again after refresh_s, not on every image
                return previous.version
            state.entry = _Entry(version, self._clock())
            if previous is not None and previous.version != version:
                log.info("line %r: live model %s -> %s", line, previous.version, version)
                if self._on_change is not None:
                    self._on_change(line, previous.version, version)
            return version

    def versions(self) -> set[str]:
        """Every version some line resolved to last (no I/O)."""
        return {state.entry.version for state in self._lines.values() if state.entry is not None}
