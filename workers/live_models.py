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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 2.0
"""How stale a line's live version may be: a promotion reaches the service within this many seconds."""


@dataclass
class _Entry:
    version: str
    read_at: float


class LiveVersions:
    """A per-line cache of the live model version, refreshed through ``resolve(line)`` (a blocking call).

    ``resolve`` is `ModelRegistry.live_version` in the service; it runs in a worker thread so that the
    event loop keeps serving while the object store answers. One refresh per line runs at a time.
    """

    def __init__(
        self,
        resolve: Callable[[str], str],
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str, str], None] | None = None,
    ) -> None:
        if refresh_s < 0:
            msg = f"refresh_s must be >= 0, got {refresh_s}"
            raise ValueError(msg)
        self._resolve = resolve
        self.refresh_s = refresh_s
        self._clock = clock
        self._on_change = on_change
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _fresh(self, line: str) -> str | None:
        entry = self._entries.get(line)
        if entry is not None and self._clock() - entry.read_at < self.refresh_s:
            return entry.version
        return None

    async def version(self, line: str) -> str:
        """The live version of ``line``, at most ``refresh_s`` old.

        Raises what ``resolve`` raises (e.g. `ModelNotFound`) only when no version was ever read for ``line``.
        """
        fresh = self._fresh(line)
        if fresh is not None:
            return fresh
        lock = self._locks.setdefault(line, asyncio.Lock())
        async with lock:
            fresh = self._fresh(line)  # another request refreshed it while this one waited
            if fresh is not None:
                return fresh
            previous = self._entries.get(line)
            try:
                version = await asyncio.to_thread(self._resolve, line)
            except Exception as exc:
                if previous is None:
                    raise
                log.warning("cannot read the live model of line %r (%s); still serving %s", line, exc, previous.version)
                previous.read_at = self._clock()  # try again after refresh_s, not on every image
                return previous.version
            self._entries[line] = _Entry(version, self._clock())
            if previous is not None and previous.version != version:
                log.info("line %r: live model %s -> %s", line, previous.version, version)
                if self._on_change is not None:
                    self._on_change(line, previous.version, version)
            return version

    def versions(self) -> set[str]:
        """Every version some line resolved to last (no I/O)."""
        return {entry.version for entry in self._entries.values()}
