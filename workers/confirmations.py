"""Operators' confirmations on ``anomap:confirmations``: publishing them, and filing them into ``datasets/``.

    publish_confirmation(client, names, Confirmation(job_id="cam01-7", label="abnormal", boxes=[box]))
    stats = ingest_confirmations(client, store, names, IngestConfig(consumer="ingest-1"))   # --once
    ingest_confirmations(client, store, names, config, stop=stop_event)                     # until stop

`ingest_confirmations` reads the stream as a member of the ``datasets`` consumer group (its own
pending entries first, then entries idle too long in others', then new ones) and gives each entry
exactly one answer:

- filed: the image (and mask) are written by `workers.datasets.file_confirmation`, *then* the entry
  is acknowledged; filing is idempotent, so a redelivered entry writes nothing new; the job's newest
  filed entry is kept (``<prefix>:filed:<line>:<job_id>``), so an older confirmation retried late
  is acknowledged without being filed over a newer one (``superseded``). "Newer" is by the operator's
  ``confirmed_at``, then by entry id, so a confirmation re-driven from a dead letter stays as old as it
  was. A reader files a job only while it holds the job's filing lock
  (``<prefix>:filing:<line>:<job_id>``, renewed while it files), and the marker only moves forward,
  so two readers (``anomap confirmations ingest`` and the retrain controller, say) handling an older
  and a newer confirmation of one job at once cannot leave the older one filed;
- dead letter on ``anomap:dead`` with a `DeadReason` (``invalid_json``, ``invalid_schema``,
  ``unknown_job``, ``box_outside_image``, ``mask_size_mismatch``, ``empty_mask``, ``missing_object``,
  ``too_many_deliveries``, ...), written and acknowledged in one Lua script;
- left pending when the store or Redis is away (any other error): tried again on the next run, or
  reclaimed after ``claim_idle_ms`` by another reader. Nothing is acknowledged before it is written,
  and no entry can crash the reader.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import redis
from pydantic import ValidationError

from schemas import Confirmation, DeadLetter, DeadReason, StreamNames
from schemas.confirmation import CONFIRMATION_FIELD
from schemas.envelope import parse_json, peek_raw_ids, printable
from trainer.store import ObjectStore
from workers.datasets import ConfirmationRejected, file_confirmation
from workers.group_reader import Entry, GroupReader
from workers.redis_lock import RenewedLock
from workers.stream_scripts import ADVANCE_FILED_MARKER, COMMIT_DEAD

log = logging.getLogger("anomap.confirmations")

CONFIRMATIONS_MAXLEN = 100_000
MAX_CONFIRMATION_BYTES = 64 * 1024


@dataclass(frozen=True)
class IngestConfig:
    """How one reader of the ``datasets`` group reads and gives up; ``filing_wait_s``: how long it waits for
    another reader's filing of the same job before it leaves the entry pending."""

    consumer: str = "ingest-1"
    batch: int = 16
    block_ms: int = 500
    claim_idle_ms: int = 60_000
    max_deliveries: int = 5
    dead_maxlen: int = 100_000
    settled_ttl_s: int = 7 * 24 * 3600
    filing_wait_s: float = 30.0


FILING_LOCK_MS = 20_000
"""A job's filing lock is renewed while its reader files (`RenewedLock`) and expires this long after a
reader crashed: shorter than ``filing_wait_s``, so a reader waiting behind a crashed one gets the job in the
same delivery, and lock contention never uses up an entry's deliveries."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FAILURE_CHARS = 500
"""How much of a failed try's error is kept for the dead letter."""


class Filed(StrEnum):
    """What happened to one confirmation entry."""

    WRITTEN = "written"
    """Objects in ``datasets/`` were written or removed."""
    UNCHANGED = "unchanged"
    """Everything was already in place (a repeated confirmation or a redelivery)."""
    SUPERSEDED = "superseded"
    """A newer confirmation of the same job was filed first (this one was retried late): acknowledged, not
    filed, so that the operator's last word stands."""
    DEAD = "dead"
    RETRY = "retry"
    """Left pending: the store or Redis failed; it is tried again later."""


def publish_confirmation(
    client: redis.Redis, names: StreamNames, confirmation: Confirmation, maxlen: int = CONFIRMATIONS_MAXLEN
) -> str:
    """Add a confirmation to ``anomap:confirmations``; returns the entry id."""
    fields = {CONFIRMATION_FIELD: confirmation.model_dump_json().encode()}
    entry_id = client.xadd(names.confirmations, fields, maxlen=maxlen, approximate=True)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def decode_confirmation_entry(fields: dict[bytes, bytes]) -> Confirmation:
    """Validate an entry's fields; raises `ConfirmationRejected` naming the problem."""
    if set(fields) != {CONFIRMATION_FIELD}:
        names = sorted(k.decode(errors="replace")[:40] for k in fields)
        raise ConfirmationRejected(DeadReason.INVALID_ENTRY, f"entry fields {names}; expected only 'confirmation'")
    raw = fields[CONFIRMATION_FIELD]
    if len(raw) > MAX_CONFIRMATION_BYTES:
        msg = f"confirmation is {len(raw)} bytes; at most {MAX_CONFIRMATION_BYTES} are allowed"
        raise ConfirmationRejected(DeadReason.PAYLOAD_TOO_LARGE, msg)
    try:
        payload = parse_json(raw)
    except ValueError as exc:  # not UTF-8 or not JSON, or nested too deeply
        raise ConfirmationRejected(DeadReason.INVALID_JSON, f"confirmation is not JSON: {exc}") from exc
    try:
        return Confirmation.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'confirmation'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfirmationRejected(DeadReason.INVALID_SCHEMA, problems[:1500]) from exc


def filed_marker_value(confirmation: Confirmation, entry_id: str) -> str:
    """What a job's filed marker holds for this confirmation: ``"<confirmed_at µs since the epoch> <entry id>"``."""
    return f"{_epoch_us(confirmation.confirmed_at)} {entry_id}"


def filed_order(marker: str) -> tuple[int, int, int]:
    """A filed marker as (confirmed_at µs, entry ms, entry seq), which sorts confirmations of one job by when
    the operator confirmed, then by entry: a confirmation re-driven from a dead letter (a new entry id, its
    old ``confirmed_at``) stays older than one the operator sent after it. A bare entry id (an older
    release's marker) counts as confirmed at its entry's millisecond."""
    confirmed, _, entry_id = marker.rpartition(" ")
    ms, _, seq = entry_id.partition("-")
    return (int(confirmed) if confirmed else int(ms) * 1000), int(ms), int(seq or 0)


def _epoch_us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


class ConfirmationIngester:
    """One member of the ``datasets`` group on ``anomap:confirmations``."""

    def __init__(self, client: redis.Redis, store: ObjectStore, names: StreamNames, config: IngestConfig) -> None:
        self.redis = client
        self.store = store
        self.names = names
        self.config = config
        self.stream = names.confirmations
        self.reader = GroupReader(
            client, names, config.consumer, [self.stream], config.claim_idle_ms, group=names.dataset_group
        )
        self._commit_dead = client.register_script(COMMIT_DEAD)
        self._advance_marker = client.register_script(ADVANCE_FILED_MARKER)
        self.counts: dict[Filed, int] = dict.fromkeys(Filed, 0)

    def _dead(self, entry: Entry, reason: DeadReason, detail: str, job_id: str | None, line: str | None) -> Filed:
        _, entry_id, _, deliveries = entry
        letter = DeadLetter(
            entry_id=entry_id,
            stream=self.stream,
            job_id=job_id,
            line=line,
            reason=reason,
            detail=detail[:2000],
            delivery_count=max(deliveries, 1),
        )
        settled = f"{self.names.prefix}:settled:{self.stream}:{entry_id}"
        self._commit_dead(
            keys=[self.names.dead, self.stream, settled],
            args=[
                entry_id,
                self.reader.group,
                self.config.dead_maxlen,
                letter.model_dump_json(),
                self.config.settled_ttl_s,
            ],
        )
        log.warning("confirmation %s (job %r) → dead letter: %s: %s", entry_id, job_id, reason.value, detail[:200])
        return Filed.DEAD

    def process(self, entry: Entry) -> Filed:
        """File one entry to its end: written or unchanged (then acknowledged), dead, or left pending."""
        _, entry_id, fields, deliveries = entry
        job_id, line = peek_raw_ids(fields.get(CONFIRMATION_FIELD))
        try:
            try:
                if not fields:
                    detail = "the entry was trimmed from its stream (MAXLEN) or deleted while pending"
                    raise ConfirmationRejected(DeadReason.TRIMMED, detail)
                if deliveries > self.config.max_deliveries:  # first: no failure may repeat forever
                    detail = f"delivered {deliveries} times (limit {self.config.max_deliveries}) without being filed"
                    if failure := self._last_failure(entry_id):
                        detail += f"; the last try failed: {failure}"
                    raise ConfirmationRejected(DeadReason.TOO_MANY_DELIVERIES, detail)
                confirmation = decode_confirmation_entry(fields)
            except ConfirmationRejected as exc:
                return self._dead(entry, exc.reason, exc.detail, job_id, line)
            lock = RenewedLock(
                self.redis, self.names.filing_lock(confirmation.line, confirmation.job_id), FILING_LOCK_MS
            )
            if not lock.acquire(self.config.filing_wait_s):
                waited = f"another reader held {lock.key} for {self.config.filing_wait_s:g} s"
                log.warning("confirmation %s: %s; left pending", entry_id, waited)
                self._note_failure(entry_id, TimeoutError(waited))
                return Filed.RETRY
            try:
                return self._file(entry_id, confirmation, entry)
            finally:
                self._release(lock)
        except Exception as exc:  # the store or Redis away, or a bug: leave it pending, never crash
            log.warning("confirmation %s (job %r): not filed, left pending: %r", entry_id, job_id, exc)
            self._note_failure(entry_id, exc)
            return Filed.RETRY

    def _note_failure(self, entry_id: str, exc: BaseException) -> None:
        """Keep why this try failed, for the dead letter if every try does; best effort (Redis may be why)."""
        try:
            text = printable(repr(exc), FAILURE_CHARS)
            self.redis.set(self.names.failure_marker(self.stream, entry_id), text, ex=self.config.settled_ttl_s)
        except redis.RedisError:
            pass

    def _last_failure(self, entry_id: str) -> str | None:
        """Why the entry's last try failed (`_note_failure`), if that is known."""
        try:
            text = self.redis.get(self.names.failure_marker(self.stream, entry_id))
        except redis.RedisError:
            return None
        return text.decode(errors="replace") if text is not None else None

    def _release(self, lock: RenewedLock) -> None:
        try:
            lock.release()
        except redis.RedisError as exc:  # it expires after FILING_LOCK_MS; the entry's own outcome stands
            log.warning("could not release %s (expires in %d s): %r", lock.key, FILING_LOCK_MS // 1000, exc)

    def _file(self, entry_id: str, confirmation: Confirmation, entry: Entry) -> Filed:
        """File one decoded confirmation while its job's filing lock is held (superseded when a newer one was
        filed first), move the job's filed marker forward, then acknowledge."""
        job_id = confirmation.job_id
        latest = self.names.filed_marker(confirmation.line, job_id)
        mine = filed_marker_value(confirmation, entry_id)
        newer = self.redis.get(latest)
        if newer is not None and filed_order(newer.decode()) > filed_order(mine):
            self.redis.xack(self.stream, self.reader.group, entry_id)
            log.info("confirmation %s: entry %s of job %s was filed already", entry_id, newer.decode(), job_id)
            return Filed.SUPERSEDED
        try:
            filed = file_confirmation(self.redis, self.store, self.names, confirmation)
        except ConfirmationRejected as exc:
            return self._dead(entry, exc.reason, exc.detail, job_id, confirmation.line)
        if not self._advance_marker(keys=[latest], args=[mine, self.config.settled_ttl_s]):
            # only when the lock expired while Redis was away (its renewals failed) and another reader filed
            # a later confirmation meanwhile: which one the dataset holds depends on whose writes came last
            log.error(
                "confirmation %s of job %s was filed while a later one (%s) was: confirm the job again to be sure "
                "datasets/ holds the later label",
                entry_id,
                job_id,
                self.redis.get(latest),
            )
        self.redis.xack(self.stream, self.reader.group, entry_id)
        if filed.changed:
            log.info("confirmation %s: job %s filed as %s", entry_id, job_id, confirmation.label.value)
        return Filed.WRITTEN if filed.changed else Filed.UNCHANGED

    def _take(self, block_ms: int) -> list[Entry]:
        if self.reader.has_backlog:
            entries = self.reader.own_pending(self.config.batch, ())
            if entries or self.reader.has_backlog:
                return entries
        return self.reader.claim(self.config.batch, ()) or self.reader.read_new(self.config.batch, block_ms, ())

    def run(self, stop: threading.Event | None = None) -> dict[Filed, int]:
        """File entries until none is left (``stop`` None: one pass, as ``--once``) or ``stop`` is set."""
        self.reader.ensure_groups()
        self.reader.start()
        while stop is None or not stop.is_set():
            entries = self._take(self.config.block_ms if stop is not None else 1)
            if not entries and stop is None and not self.reader.has_backlog:
                break
            for entry in entries:
                outcome = self.process(entry)
                self.counts[outcome] += 1
        return self.counts


def ingest_confirmations(
    client: redis.Redis,
    store: ObjectStore,
    names: StreamNames,
    config: IngestConfig | None = None,
    stop: threading.Event | None = None,
) -> dict[Filed, int]:
    """File confirmations into ``datasets/``: all that are waiting (``stop`` None) or until ``stop`` is set.

    Returns how many entries were written, unchanged, dead-lettered and left pending.
    """
    return ConfirmationIngester(client, store, names, config or IngestConfig()).run(stop)
