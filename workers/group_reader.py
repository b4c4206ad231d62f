"""`GroupReader`: how one consumer takes entries from its consumer group's job streams.

Three sources, in the order a consumer should use them:

    reader.start()                         # forget cursors: own pending list from the beginning
    reader.own_pending(limit, skip)        # entries this consumer read before (a crash), oldest first
    reader.claim(limit, skip)              # entries idle past claim_idle_ms anywhere (XAUTOCLAIM)
    reader.read_new(limit, block_ms, skip) # never-delivered entries (XREADGROUP >)

Each returns ``(stream, entry id, fields, delivery count)`` tuples and skips the ``(stream, entry id)``
pairs in ``skip`` (the entries in flight; ids are unique only within a stream). An entry trimmed away
(``MAXLEN``) or deleted while pending comes back with empty ``fields``: its content is gone, and the
consumer answers it with a dead letter, so that not even such an entry ends without a trace. No call
returns more than ``limit`` entries: what several streams deliver at once beyond it is held and returned
by the next `own_pending`. `keep_claimed` resets the idle time of entries in flight and held
(``XCLAIM … JUSTID``, no delivery counted) so that no other consumer reclaims them while they wait out
an outage; `is_pending` tells whether an entry is still in the group's pending list. `forget_dead`
removes group members that hold nothing and have not even tried to read for a long time (crashed
processes: every consumer's name carries its process id, so each restart adds one)::

    reader.forget_dead(idle_ms=3_600_000)  # ["host-4711-0"]: XGROUP DELCONSUMER, pending 0 only
"""

from __future__ import annotations

from collections.abc import Container, Iterable

import redis

from schemas import StreamNames
from workers.stream_scripts import FORGET_IDLE_CONSUMER

Entry = tuple[str, str, dict[bytes, bytes], int]  # (stream, entry id, fields, delivery count)
EntryKey = tuple[str, str]  # (stream, entry id): ids are unique only within one stream


class GroupReader:
    """One consumer's view of a consumer group (``scorers`` unless ``group`` says otherwise) on some streams."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        consumer: str,
        streams: list[str],
        claim_idle_ms: int,
        group: str | None = None,
    ) -> None:
        self.redis = client
        self.group = group or names.scorer_group
        self.consumer = consumer
        self.streams = streams
        self.claim_idle_ms = claim_idle_ms
        self._pending_cursor: dict[str, str] = {}
        self._held: list[Entry] = []  # delivered by read_new beyond its limit, not yet handed out
        self._claim_cursor: dict[str, str] = dict.fromkeys(streams, "0-0")
        self._forget = client.register_script(FORGET_IDLE_CONSUMER)

    def ensure_groups(self) -> None:
        """Create the consumer group on every job stream (and the stream) if missing."""
        for stream in self.streams:
            try:
                self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def start(self) -> None:
        """Read the own pending list again from its beginning (at every (re)start)."""
        self._pending_cursor = dict.fromkeys(self.streams, "0")
        self._held = []  # they are in the pending list, which is read again from its start

    @property
    def held(self) -> list[EntryKey]:
        """The entries delivered to this consumer and held for the next `own_pending` (they are pending)."""
        return [(entry[0], entry[1]) for entry in self._held]

    @property
    def has_backlog(self) -> bool:
        """Whether the own pending list has not been read to its end yet, or entries are held."""
        return bool(self._pending_cursor or self._held)

    def _entries(
        self,
        stream: str,
        items: list[tuple[bytes, dict[bytes, bytes] | None]],
        fresh: bool,
        skip: Container[EntryKey],
    ) -> list[Entry]:
        entries: list[Entry] = []
        for entry_id, fields in items:
            eid = entry_id.decode()
            if (stream, eid) in skip:
                continue
            # empty fields: trimmed away while pending; the consumer dead-letters it
            entries.append((stream, eid, fields or {}, 1 if fresh else self.deliveries(stream, eid)))
        return entries

    def own_pending(self, limit: int, skip: Container[EntryKey]) -> list[Entry]:
        """The entries held back by `read_new`, then the next page of entries this consumer read before (a
        crash), oldest first."""
        held = [entry for entry in self._held if (entry[0], entry[1]) not in skip]
        self._held = held[limit:]
        entries = held[:limit]
        if entries:
            return entries
        for stream in list(self._pending_cursor):
            cursor = {stream: self._pending_cursor[stream]}
            reply = self.redis.xreadgroup(self.group, self.consumer, cursor, count=limit)
            items = reply[0][1] if reply else []
            if not items:
                del self._pending_cursor[stream]
                continue
            self._pending_cursor[stream] = items[-1][0].decode()
            entries.extend(self._entries(stream, items, fresh=False, skip=skip))
            if len(entries) >= limit:
                break
        return self._at_most(limit, entries)

    def is_pending(self, stream: str, entry_id: str) -> bool:
        """Whether the entry is in the group's pending list (any consumer's): delivered, not yet acknowledged,
        and not dropped from the list for having been deleted from its stream."""
        return bool(self._pending_record(stream, entry_id))

    def in_stream(self, stream: str, entry_id: str) -> bool:
        """Whether the entry is still in its stream (not deleted or trimmed)."""
        return bool(self.redis.xrange(stream, min=entry_id, max=entry_id, count=1))

    def take_held(self) -> list[Entry]:
        """The held entries (`held`), no longer held: the caller answers for them."""
        held, self._held = self._held, []
        return held

    def deliveries(self, stream: str, entry_id: str) -> int:
        """How often the entry was delivered (1 if it is not pending)."""
        info = self._pending_record(stream, entry_id)
        return int(info[0]["times_delivered"]) if info else 1

    def _pending_record(self, stream: str, entry_id: str) -> list[dict[str, object]]:
        """The entry's record in the group's pending list (``XPENDING``): one dict, or none if not pending."""
        return self.redis.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)

    def claim(self, limit: int, skip: Container[EntryKey]) -> list[Entry]:
        """Entries idle past ``claim_idle_ms`` in any consumer's pending list (a dead consumer's)."""
        entries: list[Entry] = []
        for stream in self.streams:
            reply = self.redis.xautoclaim(
                stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id=self._claim_cursor[stream],
                count=limit,
            )
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            self._claim_cursor[stream] = cursor  # "0-0" once the whole pending list was scanned
            entries.extend(self._entries(stream, reply[1] if len(reply) > 1 else [], fresh=False, skip=skip))
            deleted = [(eid, None) for eid in (reply[2] if len(reply) > 2 else [])]  # gone, and out of the PEL
            entries.extend(self._entries(stream, deleted, fresh=True, skip=skip))
            if len(entries) >= limit:
                break
        return self._at_most(limit, entries)

    def read_new(self, limit: int, block_ms: int, skip: Container[EntryKey]) -> list[Entry]:
        """Up to ``limit`` entries never delivered to anyone, waiting up to ``block_ms`` for some (the rest of
        what several streams deliver at once is held for `own_pending`)."""
        reply = self.redis.xreadgroup(
            self.group, self.consumer, dict.fromkeys(self.streams, ">"), count=limit, block=block_ms
        )
        entries: list[Entry] = []
        for stream, items in reply or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            entries.extend(self._entries(name, items, fresh=True, skip=skip))
        return self._at_most(limit, entries)

    def _at_most(self, limit: int, entries: list[Entry]) -> list[Entry]:
        """The first ``limit`` of ``entries``; the rest, delivered to this consumer already, held for `own_pending`."""
        self._held.extend(entries[limit:])
        return entries[:limit]

    def forget_dead(self, idle_ms: int) -> list[str]:
        """Delete the group's other consumers that have no pending entries and were idle over ``idle_ms``.

        ``idle`` is the time since a consumer last tried to read: a live one reads every few hundred
        milliseconds, even when there is nothing to read. A consumer with pending entries is never
        deleted (its entries are reclaimed by `claim` first), and one that comes back after being
        forgotten is recreated by its next read. Returns the names deleted (once per stream).
        """
        forgotten: list[str] = []
        for stream in self.streams:
            for info in self.redis.xinfo_consumers(stream, self.group):
                raw = info["name"]
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                if name == self.consumer or int(info["pending"]) > 0 or int(info["idle"]) <= idle_ms:
                    continue
                if self._forget(keys=[stream], args=[self.group, name]) == 1:  # still nothing pending: deleted
                    forgotten.append(name)
        return forgotten

    def keep_claimed(self, in_flight: Iterable[EntryKey], held: bool = True) -> None:
        """Reset the idle time of the entries in flight (``(stream, entry id)`` pairs) and, with ``held``, of
        those held."""
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in {*in_flight, *(self.held if held else ())}:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            self.redis.xclaim(stream, self.group, self.consumer, 0, ids, justid=True)
