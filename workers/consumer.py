"""`StreamConsumer`: jobs from Redis Streams → Serve → object store → results stream.

At-least-once delivery, exactly one answer (result or dead letter) per entry, nothing lost. The consumer
reads and keeps entries; `EntryProcessor` (`workers.entry_processor`) takes each to its answer:

1. On start it drains its own pending list (entries it read before a crash), a page at a time,
   then reads new ones (``XREADGROUP >``) with at most ``max_in_flight`` jobs in flight.
2. Entries idle in any consumer's pending list past ``claim_idle_ms`` are reclaimed
   (``XAUTOCLAIM``); an entry delivered more than ``max_deliveries`` times becomes a dead letter.
   The consumer refreshes the idle time of the entries it is working on (``XCLAIM … JUSTID``, which
   does not count a delivery), so a job that waits out an outage is not taken from it.
3. Each entry runs in a worker thread (`EntryProcessor.process_entry`): a result, a dead letter with
   its `DeadReason`, or ``Outcome.RETRY`` (left pending, reclaimed after ``claim_idle_ms``, which counts
   a delivery). An entry deleted from its stream while a try at it failed is answered with a
   ``trimmed`` dead letter at once (`_settle_if_gone`): it has left the pending list, so no later
   delivery would come.
4. While a job waits for Serve to take it (backpressure), the consumer reads no new entries, and its
   intake limit (`IntakeLimit`, at most ``max_in_flight``) follows the refusals.
5. The read loop backs off while Redis is down, and re-creates the consumer group if the server lost it.
6. ``run(stop)`` returns after the jobs in flight finish (graceful drain, their entries kept claimed
   meanwhile); after ``drain_timeout_s`` their waits are cut short and unfinished entries stay pending.
7. Where Ray is initialised, jobs, results, dead letters, refusals, latencies per stage and, every
   ``backlog_every_s``, the group's lag and pending count per line are recorded as Ray metrics
   (`workers.telemetry`). Log lines about a job carry its ``job_id``, ``line`` and ``entry_id``
   (`workers.logs`).

    consumer = StreamConsumer(redis, store, inspector, StreamNames(), ConsumerConfig(consumer="c1"))
    consumer.run(stop_event)
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import redis

from schemas import DeadReason, StreamNames
from schemas.envelope import peek_raw_ids
from schemas.stream import JOB_FIELD
from trainer.store import ObjectStore
from workers import telemetry
from workers.consumer_config import REDIS_TRANSIENT, ConsumerConfig, ConsumerStats, Outcome
from workers.entry_processor import EntryProcessor, consumer_backoff
from workers.group_reader import Entry, EntryKey, GroupReader
from workers.inspection import Inspector
from workers.retry import IntakeLimit

log = logging.getLogger("anomap.consumer")

__all__ = ["REDIS_TRANSIENT", "ConsumerConfig", "ConsumerStats", "Outcome", "StreamConsumer"]


class StreamConsumer:
    """One member of the ``scorers`` consumer group, reading one or more lines' job streams."""

    def __init__(
        self,
        client: redis.Redis,
        store: ObjectStore,
        inspector: Inspector,
        names: StreamNames,
        config: ConsumerConfig,
    ) -> None:
        self.redis = client
        self.names = names
        self.config = config
        self.stats = ConsumerStats()
        self._streams = [names.jobs(line) for line in config.lines]
        self._in_flight: set[EntryKey] = set()
        self._unchecked: dict[EntryKey, tuple[int, str | None, str | None]] = {}  # `_settle_if_gone` owed; _lock
        self._lock = threading.Lock()
        self._abort = threading.Event()  # set when a drain runs out of time: retry waits end
        self.intake = IntakeLimit(config.max_in_flight)
        self.processor = EntryProcessor(client, store, inspector, names, config, self.stats, self.intake, self._abort)
        self.reader = GroupReader(client, names, config.consumer, self._streams, config.claim_idle_ms)

    def ensure_groups(self) -> None:
        """Create the consumer group on every job stream (and the stream) if missing, and add the lines
        to the set of lines in use."""
        self.reader.ensure_groups()
        self.redis.sadd(self.names.lines, *self.config.lines)

    def process_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> Outcome:
        """Handle one delivered entry to its end: a result, a dead letter, or left for retry
        (`EntryProcessor.process_entry`)."""
        return self.processor.process_entry(stream, entry_id, fields, deliveries)

    # ---- the loop ---------------------------------------------------------------------------
    def _run_one(self, entry: Entry) -> Outcome:
        stream, entry_id, fields, deliveries = entry
        try:
            outcome = self.processor.process_entry(stream, entry_id, fields, deliveries)
        except redis.RedisError as exc:  # Redis stayed away past redis_retry_s
            elog = self.processor.entry_log(stream, entry_id, fields)
            elog.warning("entry %s: redis error, left pending: %r", entry_id, exc)
            self.processor.note_failure(stream, entry_id, "reaching Redis", exc)
            outcome = Outcome.RETRY
        except Exception as exc:  # a bug must not stop the consumer; the entry is retried, then dead-lettered
            elog = self.processor.entry_log(stream, entry_id, fields)
            elog.exception("entry %s: unexpected error, left pending", entry_id)
            self.processor.note_failure(stream, entry_id, "with an unexpected error", exc)
            outcome = Outcome.RETRY
        try:
            if outcome is Outcome.RETRY:
                job_id, line = peek_raw_ids(fields.get(JOB_FIELD))
                outcome = self._settle_if_gone(stream, entry_id, deliveries, job_id, line)
            return outcome
        finally:
            with self._lock:
                self._in_flight.discard((stream, entry_id))

    def _settle_if_gone(
        self,
        stream: str,
        entry_id: str,
        deliveries: int,
        job_id: str | None,
        line: str | None,
        retry_s: float | None = None,
    ) -> Outcome:
        """After a failed try: `Outcome.RETRY` while the entry is still pending or still in its stream (a
        later delivery tries again), else a dead letter. An entry deleted from its stream (``XDEL``) leaves
        every pending list at the next ``XAUTOCLAIM`` or ``XCLAIM``, so no later delivery would come; the
        dead letter is this entry's only answer (none if another consumer answered it meanwhile). An entry
        still in its stream but in no pending list (a restarted Redis that lost the read which delivered
        it) is delivered again as a new one. When Redis cannot be asked, the entry is kept and asked about
        again by the read loop. Redis errors are retried for ``retry_s`` (default ``redis_retry_s``)."""
        try:
            if self.reader.is_pending(stream, entry_id) or self.reader.in_stream(stream, entry_id):
                return Outcome.RETRY
            detail = "the entry was deleted from its stream (XDEL, or a MAXLEN trim) while a try was failing"
            failure = self.processor.last_failure(stream, entry_id)
            if failure:
                detail += f"; the last try failed {failure}"
            return self.processor.dead(stream, entry_id, deliveries, DeadReason.TRIMMED, detail, job_id, line, retry_s)
        except redis.RedisError:
            with self._lock:
                self._unchecked[(stream, entry_id)] = (deliveries, job_id, line)
            return Outcome.RETRY

    def _settle_unchecked(self) -> None:
        """`_settle_if_gone` for the entries Redis could not be asked about before, one try each (the read
        loop calls this: it must not wait out an outage here); those it still cannot ask about stay."""
        with self._lock:
            owed, self._unchecked = self._unchecked, {}
        for (stream, entry_id), (deliveries, job_id, line) in owed.items():
            if self._settle_if_gone(stream, entry_id, deliveries, job_id, line, retry_s=0.0) is Outcome.DEAD:
                self.stats.add(Outcome.DEAD)

    def _settle_held(self) -> None:
        """At stop: the entries read but never started (`GroupReader.take_held`) stay pending for another
        consumer, unless one was deleted from its stream and has left the pending list meanwhile (keeping
        it claimed drops it): that one is answered with a dead letter here, or by nobody."""
        for stream, entry_id, fields, deliveries in self.reader.take_held():
            job_id, line = peek_raw_ids(fields.get(JOB_FIELD))
            if self._settle_if_gone(stream, entry_id, deliveries, job_id, line, retry_s=0.0) is Outcome.DEAD:
                self.stats.add(Outcome.DEAD)

    def _next_entries(self, capacity: int, busy: bool, last_claim: float) -> tuple[list[Entry], float]:
        """Up to ``capacity`` entries: own pending first, then reclaimed ones when due, then new ones."""
        entries: list[Entry] = []
        with self._lock:
            skip = set(self._in_flight)
        if self.reader.has_backlog:
            entries = self.reader.own_pending(capacity, skip)
        if not entries and time.monotonic() - last_claim > self.config.claim_every_s:
            last_claim = time.monotonic()
            entries = self.reader.claim(capacity, skip)
        if not entries and not self.reader.has_backlog:
            entries = self.reader.read_new(capacity, 20 if busy else self.config.block_ms, skip)
        return entries, last_claim

    def sample_backlog(self) -> None:
        """Record the group's lag and pending count on each job stream (``anomap_stream_lag``/``_pending``)."""
        group = self.names.scorer_group
        for stream, line in self.processor.line_of.items():
            for info in self.redis.xinfo_groups(stream):
                name = info["name"]
                if (name.decode() if isinstance(name, bytes) else name) == group:
                    lag = info.get("lag")
                    telemetry.stream_backlog(line, None if lag is None else int(lag), int(info["pending"]))

    def _forget_dead(self) -> None:
        """Delete dead group members (`GroupReader.forget_dead`); a Redis error only postpones it."""
        try:
            forgotten = self.reader.forget_dead(self.config.forget_idle_ms)
        except redis.RedisError as exc:
            log.debug("consumer %s: forgetting dead consumers failed: %r", self.config.consumer, exc)
            return
        if forgotten:
            log.info("consumer %s: removed idle consumers %s (nothing pending)", self.config.consumer, forgotten)

    def _keep_claimed(self, held: bool = True) -> None:
        """Refresh the idle time of the entries in flight and, with ``held``, of those held for later
        (`GroupReader.keep_claimed`)."""
        with self._lock:
            in_flight = list(self._in_flight)
        self.reader.keep_claimed(in_flight, held)

    def _drain(self, futures: set[Future[Outcome]], keep_every_s: float) -> None:
        """Wait up to ``drain_timeout_s`` for the jobs in flight, keeping their entries claimed meanwhile
        (no other consumer takes them over while they finish here); then cut their retries short."""
        late: set[Future[Outcome]] = set(futures)
        if late:
            log.info("consumer %s: draining %d job(s) in flight", self.config.consumer, len(late))
        deadline = time.monotonic() + self.config.drain_timeout_s
        while late and time.monotonic() < deadline:
            _, late = wait(late, timeout=min(keep_every_s, max(0.0, deadline - time.monotonic())))
            try:
                self._keep_claimed(held=False)  # the held ones are not run: another consumer may take them
            except redis.RedisError as exc:  # the jobs' own retries wait for Redis
                log.debug("consumer %s: keeping entries claimed failed: %r", self.config.consumer, exc)
        if late:
            log.warning(
                "consumer %s: %d job(s) still in flight after drain; cutting retries short",
                self.config.consumer,
                len(late),
            )
            self._abort.set()
        for future in futures:
            self.stats.add(future.result())
        self._settle_held()
        if self._unchecked:
            self._settle_unchecked()  # one more try for what Redis could not be asked about
        if self._unchecked:
            log.error(
                "consumer %s: could not tell whether entries %s are still pending (Redis unreachable); "
                "an entry deleted from its stream meanwhile has no answer",
                self.config.consumer,
                sorted(self._unchecked),
            )

    def run(self, stop: threading.Event) -> ConsumerStats:
        """Consume until ``stop`` is set, then finish the jobs in flight (graceful drain).

        Survives Redis going away: reads back off (capped exponential) until it returns, and the
        consumer group is created again if the server came back without it.
        """
        self._abort.clear()
        self.reader.start()
        backoff = consumer_backoff(self.config)
        need_groups = True
        last_claim = 0.0
        last_backlog = 0.0
        last_forget = 0.0
        last_settle = 0.0
        last_keep = time.monotonic()
        keep_every_s = max(self.config.claim_idle_ms / 3000, 0.05)
        futures: set[Future[Outcome]] = set()
        with ThreadPoolExecutor(self.config.max_in_flight, thread_name_prefix=self.config.consumer) as pool:
            while not stop.is_set():
                # while a job waits for Serve to take it, take nothing new
                limit = 0 if self.processor.waiting_for_capacity else self.intake.current
                capacity = limit - len(futures)
                entries: list[Entry] = []
                try:
                    if need_groups:
                        self.ensure_groups()
                        need_groups = False
                    if (futures or self.reader.held) and time.monotonic() - last_keep > keep_every_s:
                        self._keep_claimed()
                        last_keep = time.monotonic()
                    if self._unchecked and time.monotonic() - last_settle > self.config.claim_every_s:
                        last_settle = time.monotonic()
                        self._settle_unchecked()
                    if capacity > 0:
                        entries, last_claim = self._next_entries(capacity, bool(futures), last_claim)
                    backoff.reset()
                except redis.RedisError as exc:
                    need_groups = need_groups or "NOGROUP" in str(exc) or isinstance(exc, REDIS_TRANSIENT)
                    delay = backoff.next_delay()
                    log.warning("consumer %s: redis error (%r); retrying in %.1fs", self.config.consumer, exc, delay)
                    stop.wait(delay)
                if self.config.forget_idle_ms and time.monotonic() - last_forget > self.config.forget_every_s:
                    last_forget = time.monotonic()
                    self._forget_dead()
                if time.monotonic() - last_backlog > self.config.backlog_every_s and telemetry.enabled():
                    last_backlog = time.monotonic()
                    try:
                        self.sample_backlog()
                    except redis.RedisError as exc:  # a gap in a gauge; the read loop handles outages
                        log.debug("consumer %s: sampling the backlog failed: %r", self.config.consumer, exc)
                if entries:
                    with self._lock:
                        self._in_flight.update((entry[0], entry[1]) for entry in entries)
                    futures.update(pool.submit(self._run_one, entry) for entry in entries)
                if futures:
                    timeout = 0.05 if entries or capacity > 0 else min(1.0, keep_every_s)
                    done, futures_left = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
                    futures = set(futures_left)
                    for future in done:
                        self.stats.add(future.result())
            self._drain(futures, keep_every_s)
        return self.stats
