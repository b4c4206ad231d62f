"""`StreamConsumer`: jobs from Redis Streams → Serve → object store → results stream.

At-least-once delivery, exactly one answer (result or dead letter) per entry, nothing lost:

1. On start it drains its own pending list (entries it read before a crash), a page at a time,
   then reads new ones (``XREADGROUP >``) with at most ``max_in_flight`` jobs in flight.
2. Entries idle in any consumer's pending list past ``claim_idle_ms`` are reclaimed
   (``XAUTOCLAIM``); an entry delivered more than ``max_deliveries`` times becomes a dead letter.
   The consumer refreshes the idle time of the entries it is working on (``XCLAIM … JUSTID``, which
   does not count a delivery), so a job that waits out an outage is not taken from it.
3. A bad job (schema, image, missing object, a job on another line's stream) becomes a dead letter
   with a `DeadReason`. An entry deleted from its stream while a try at it failed is answered with a
   ``trimmed`` dead letter at once (`_settle_if_gone`): it has left the pending list, so no later
   delivery would come.
4. A good job is taken (one Lua script reads its done marker and takes its owner marker), scored, its
   map and overlay are written, and only then one Lua script adds the result, sets the job's done
   marker and acknowledges the entry (`workers.stream_scripts`).
5. Servers that are away are waited for in the job's own thread, with capped exponential backoff:
   the object store up to ``store_retry_s``, Redis up to ``redis_retry_s``, a failing Serve call
   up to ``score_retry_s``. Only then is the entry left pending (``Outcome.RETRY``), to be
   reclaimed after ``claim_idle_ms`` (which counts a delivery). The read loop itself backs off
   while Redis is down, and re-creates the consumer group if the server lost it.
6. Serve refusing a job for backpressure (`ScoringBusy`: a ``max_queued_requests`` limit is full)
   is not a failure: the job waits (jittered backoff, capped at ``busy_backoff_max_s``) and is sent
   again, for as long as that lasts; it is neither acknowledged nor dead-lettered, and no delivery
   is counted. Meanwhile the consumer reads no new entries, and its intake limit (`IntakeLimit`,
   at most ``max_in_flight``) is halved at each refusal and grows back by one per job scored.
   ``stats.backpressure`` counts the refusals.
7. ``run(stop)`` returns after the jobs in flight finish (graceful drain, their entries kept claimed
   meanwhile); after ``drain_timeout_s`` their waits are cut short and unfinished entries stay pending.
8. Where Ray is initialised, jobs, results, dead letters, refusals, latencies per stage and, every
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
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import numpy as np
import redis

from schemas import DeadLetter, DeadReason, InspectionJob, JobRejected, StreamNames
from schemas.envelope import peek_raw_ids, printable
from schemas.ids import parse_s3_ref
from schemas.stream import JOB_FIELD, decode_job_entry, entry_marker, parse_entry_marker
from trainer.imaging import ImageRejected, decode_image
from trainer.store import ObjectForbidden, ObjectMissing, ObjectStore, ObjectTooLarge
from workers import telemetry
from workers.consumer_config import REDIS_TRANSIENT, ConsumerConfig, ConsumerStats, Outcome
from workers.group_reader import Entry, EntryKey, GroupReader
from workers.inspection import Inspector, ScoredImage, ScoringBusy
from workers.logs import JobLog, job_log
from workers.maps import map_objects
from workers.results import build_result
from workers.retry import Backoff, IntakeLimit, retry_call
from workers.scored_images import kept_image_objects
from workers.stream_scripts import COMMIT_DEAD, COMMIT_RESULT, DONE_BY_ANOTHER_ENTRY, TAKE_JOB
from workers.telemetry import Stage

log = logging.getLogger("anomap.consumer")
T = TypeVar("T")
FAILURE_CHARS = 500
"""The most characters of an error a failure marker (and so a dead letter's detail) keeps."""

__all__ = ["REDIS_TRANSIENT", "ConsumerConfig", "ConsumerStats", "Outcome", "StreamConsumer"]


def describe_entry(marker: str) -> str:
    """``"entry 1-0 of anomap:jobs"`` for an owner or done marker's value (``"entry 1-0"`` for a bare id)."""
    stream, entry_id = parse_entry_marker(marker)
    return f"entry {entry_id} of {stream}" if stream else f"entry {entry_id}"


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
        self.store = store
        self.inspector = inspector
        self.names = names
        self.config = config
        self.stats = ConsumerStats()
        self._commit_result = client.register_script(COMMIT_RESULT)
        self._commit_dead = client.register_script(COMMIT_DEAD)
        self._take_job = client.register_script(TAKE_JOB)
        self._streams = [names.jobs(line) for line in config.lines]
        self._line_of = dict(zip(self._streams, config.lines, strict=True))  # job stream -> its line
        self._in_flight: set[EntryKey] = set()
        self._unchecked: dict[EntryKey, tuple[int, str | None, str | None]] = {}  # `_settle_if_gone` owed; _lock
        self._lock = threading.Lock()
        self._abort = threading.Event()  # set when a drain runs out of time: retry waits end
        self._waiting_for_capacity = 0  # jobs refused for backpressure, not yet accepted; under _lock
        self.intake = IntakeLimit(config.max_in_flight)
        self.reader = GroupReader(client, names, config.consumer, self._streams, config.claim_idle_ms)

    def ensure_groups(self) -> None:
        """Create the consumer group on every job stream (and the stream) if missing, and add the lines
        to the set of lines in use."""
        self.reader.ensure_groups()
        self.redis.sadd(self.names.lines, *self.config.lines)

    def _owner(self, stream: str, entry_id: str) -> str:
        """This entry's value in its job's owner and done markers."""
        return entry_marker(stream, entry_id)

    # ---- retrying ---------------------------------------------------------------------------
    def _backoff(self) -> Backoff:
        return Backoff(self.config.backoff_initial_s, self.config.backoff_max_s, self.config.backoff_jitter)

    def _redis_call(
        self, what: str, op: Callable[[], T], jlog: JobLog | None = None, limit_s: float | None = None
    ) -> T:
        return retry_call(
            op,
            transient=REDIS_TRANSIENT,
            limit_s=self.config.redis_retry_s if limit_s is None else limit_s,
            abort=self._abort,
            what=what,
            backoff=self._backoff(),
            log_fields=jlog.fields if jlog is not None else None,
        )

    def _store_call(self, what: str, op: Callable[[], T], jlog: JobLog) -> T:
        return retry_call(
            op,
            transient=(Exception,),  # connection refused, timeouts, 5xx: not a missing, forbidden or oversized object
            permanent=(ObjectMissing, ObjectForbidden, ObjectTooLarge),
            limit_s=self.config.store_retry_s,
            abort=self._abort,
            what=what,
            backoff=self._backoff(),
            log_fields=jlog.fields,
        )

    # ---- processing -------------------------------------------------------------------------
    def _dead(
        self,
        stream: str,
        entry_id: str,
        deliveries: int,
        reason: DeadReason,
        detail: str,
        job_id: str | None = None,
        line: str | None = None,
        retry_s: float | None = None,
    ) -> Outcome:
        """Answer the entry with a dead letter (`COMMIT_DEAD`); `Outcome.DUPLICATE` if it had an answer.
        Redis errors are retried for ``retry_s`` (default ``redis_retry_s``), then raised."""
        line = line or self._line_of.get(stream)
        job_id = printable(job_id) if job_id is not None else None
        jlog = job_log(log, job_id, line, entry_id)
        letter = DeadLetter(
            entry_id=entry_id,
            stream=stream,
            job_id=job_id,
            line=line,
            reason=reason,
            detail=detail[:2000],
            delivery_count=max(deliveries, 1),
        )
        keys = [self.names.dead, stream, self.names.settled_marker(stream, entry_id)]
        args: list[str | int] = [
            entry_id,
            self.names.scorer_group,
            self.config.dead_maxlen,
            letter.model_dump_json(),
            self.config.done_ttl_s,
        ]
        if job_id is not None:  # release the job's owner marker if this entry holds it
            keys.append(self.names.owner_marker(job_id))
            args.append(self._owner(stream, entry_id))
        written = self._redis_call(
            f"dead-lettering entry {entry_id}", lambda: self._commit_dead(keys=keys, args=args), jlog, retry_s
        )
        if written != 1:  # another consumer answered this entry first
            return Outcome.DUPLICATE
        telemetry.dead_letter(line or "unknown", reason.value)
        jlog.warning("job %r (entry %s) → dead letter: %s: %s", job_id, entry_id, reason.value, detail[:200])
        return Outcome.DEAD

    def _fetch_image(self, job: InspectionJob, inline: bytes | None, jlog: JobLog) -> bytes:
        if inline is not None:
            return inline
        assert job.image_ref is not None  # decode_job_entry guarantees one of them
        ref = parse_s3_ref(job.image_ref)
        try:
            return self._store_call(
                f"job {job.job_id}: reading {job.image_ref}",
                lambda: self.store.read_reference(ref, max_bytes=self.config.max_image_ref_bytes),
                jlog,
            )
        except ObjectMissing as exc:
            raise JobRejected(DeadReason.MISSING_OBJECT, f"{job.image_ref} does not exist", job.job_id) from exc
        except ObjectForbidden as exc:
            raise JobRejected(DeadReason.FORBIDDEN_OBJECT, str(exc), job.job_id) from exc
        except ObjectTooLarge as exc:
            raise JobRejected(DeadReason.PAYLOAD_TOO_LARGE, str(exc), job.job_id) from exc

    def _score(self, job: InspectionJob, image: np.ndarray, jlog: JobLog) -> ScoredImage:
        """Score through the inspector: failures are retried for up to ``score_retry_s``; refusals for
        backpressure are waited out for as long as they last (or until a drain is cut short)."""
        busy = Backoff(self.config.backoff_initial_s, self.config.busy_backoff_max_s, self.config.backoff_jitter)
        refusals = 0
        try:
            while True:
                try:
                    scored = retry_call(
                        lambda: self.inspector(image, job.pixel_threshold, job.line),
                        transient=(Exception,),  # a replica died, a timeout: Serve brings replicas back
                        permanent=(ScoringBusy,),
                        limit_s=self.config.score_retry_s,
                        abort=self._abort,
                        what=f"job {job.job_id}: scoring",
                        backoff=self._backoff(),
                        log_fields=jlog.fields,
                    )
                except ScoringBusy:
                    refusals += 1
                    self.stats.add_backpressure()
                    telemetry.backpressure(job.line)
                    self.intake.refused()
                    if refusals == 1:
                        with self._lock:
                            self._waiting_for_capacity += 1
                    delay = busy.next_delay()
                    jlog.log(
                        logging.INFO if refusals == 1 else logging.DEBUG,
                        "job %s: Serve is at capacity (refusal %d); trying again in %.2fs, intake limit %d",
                        job.job_id,
                        refusals,
                        delay,
                        self.intake.current,
                    )
                    if self._abort.wait(delay):  # the drain ran out of time: leave the entry pending
                        raise
                    continue
                self.intake.accepted()
                return scored
        finally:
            if refusals:
                with self._lock:
                    self._waiting_for_capacity -= 1

    def process_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> Outcome:
        """Handle one delivered entry to its end: a result, a dead letter, or left for retry."""
        telemetry.job_read(self._line_of.get(stream, "unknown"))
        if not fields:
            detail = "the entry was trimmed from its stream (MAXLEN) or deleted while pending: its job is gone"
            return self._dead(stream, entry_id, deliveries, DeadReason.TRIMMED, detail)
        if deliveries > self.config.max_deliveries:  # before anything else, so that no failure repeats forever
            job_id, line = peek_raw_ids(fields.get(JOB_FIELD))
            detail = f"delivered {deliveries} times (limit {self.config.max_deliveries}) without a result"
            failure = self._last_failure(stream, entry_id)
            if failure:
                detail += f"; the last try failed {failure}"
            return self._dead(stream, entry_id, deliveries, DeadReason.TOO_MANY_DELIVERIES, detail, job_id, line)
        try:
            job, inline = decode_job_entry(fields)
        except JobRejected as exc:
            return self._dead(stream, entry_id, deliveries, exc.reason, exc.detail, exc.job_id)
        stream_line = self._line_of.get(stream, job.line)
        if job.line != stream_line:  # it would be scored with another line's model, its result sent there
            detail = f"the job names line {job.line!r} but is on {stream}, the stream of line {stream_line!r}"
            return self._dead(stream, entry_id, deliveries, DeadReason.INVALID_ENTRY, detail, job.job_id, stream_line)
        jlog = job_log(log, job.job_id, job.line, entry_id)
        mine = self._owner(stream, entry_id)
        kind, marker = self._redis_call(
            f"job {job.job_id}: taking the job",
            lambda: self._take_job(
                keys=[self.names.done_marker(job.job_id), self.names.owner_marker(job.job_id)],
                args=[mine, self.config.progress_ttl_s],
            ),
            jlog,
        )
        kind, marker = kind.decode(), marker.decode(errors="replace")
        if kind == "done" and self._is_this_entry(marker, stream, entry_id):  # answered by an earlier delivery
            self._redis_call(
                f"job {job.job_id}: ack", lambda: self.redis.xack(stream, self.names.scorer_group, entry_id), jlog
            )
            return Outcome.DUPLICATE
        if kind == "done":
            detail = f"job_id already has a result from {describe_entry(marker)}"
            return self._dead(stream, entry_id, deliveries, DeadReason.DUPLICATE_JOB, detail, job.job_id, job.line)
        if kind == "owner" and marker != mine:
            detail = f"job_id is being scored from {describe_entry(marker)}"
            return self._dead(stream, entry_id, deliveries, DeadReason.DUPLICATE_JOB, detail, job.job_id, job.line)
        return self._inspect(stream, entry_id, job, inline, deliveries, jlog)

    @staticmethod
    def _is_this_entry(marker: str, stream: str, entry_id: str) -> bool:
        """Whether a done marker names this entry (an older release's bare entry id counts)."""
        marked_stream, marked_id = parse_entry_marker(marker)
        return marked_id == entry_id and marked_stream in (stream, None)

    def _result_entry(self, job: InspectionJob, jlog: JobLog) -> str | None:
        """The entry whose result the job has (its done marker, described), or None."""
        done = self._redis_call(
            f"job {job.job_id}: done check", lambda: self.redis.get(self.names.done_marker(job.job_id)), jlog
        )
        return describe_entry(done.decode(errors="replace")) if done is not None else None

    def _inspect(
        self, stream: str, entry_id: str, job: InspectionJob, inline: bytes | None, deliveries: int, jlog: JobLog
    ) -> Outcome:
        """Read, score and store a valid job this entry holds, then commit its result (or dead-letter it)."""
        started = time.perf_counter()
        try:
            payload = self._fetch_image(job, inline, jlog)
            image = decode_image(payload)
        except (JobRejected, ImageRejected) as exc:
            return self._dead(stream, entry_id, deliveries, exc.reason, exc.detail, job.job_id, job.line)
        except Exception as exc:  # the store stayed away past store_retry_s
            jlog.warning("job %s: reading its image failed, left pending: %r", job.job_id, exc)
            self._note_failure(stream, entry_id, "reading its image", exc)
            return Outcome.RETRY
        decoded = time.perf_counter()
        try:
            scored = self._score(job, image, jlog)
        except Exception as exc:  # Serve stayed broken past score_retry_s: leave pending, retry later
            jlog.warning("job %s: scoring failed (delivery %d), left pending: %r", job.job_id, deliveries, exc)
            self._note_failure(stream, entry_id, "scoring", exc)
            return Outcome.RETRY
        scored_at = time.perf_counter()
        try:
            map_ref, overlay_ref = self._store_map(job, image, payload, scored, jlog)
        except Exception as exc:  # the store stayed away past store_retry_s
            jlog.warning("job %s: storing the map failed, left pending: %r", job.job_id, exc)
            self._note_failure(stream, entry_id, "storing the map", exc)
            return Outcome.RETRY
        stored = time.perf_counter()
        result = build_result(
            job,
            scored,
            map_ref,
            overlay_ref,
            {
                "decode": (decoded - started) * 1e3,
                "score": (scored_at - decoded) * 1e3,
                "store": (stored - scored_at) * 1e3,
            },
        )
        written = self._redis_call(
            f"job {job.job_id}: committing the result",
            lambda: self._commit_result(
                keys=[
                    self.names.done_marker(job.job_id),
                    self.names.results(job.line),
                    stream,
                    self.names.settled_marker(stream, entry_id),
                    self.names.owner_marker(job.job_id),
                ],
                args=[
                    entry_id,
                    self.names.scorer_group,
                    self.config.done_ttl_s,
                    self.config.results_maxlen,
                    result.model_dump_json(),
                    self._owner(stream, entry_id),
                ],
            ),
            jlog,
        )
        if written == DONE_BY_ANOTHER_ENTRY:  # its owner marker had expired: the same id scored twice at once
            detail = f"job_id already has a result from {self._result_entry(job, jlog) or 'an entry (expired)'}"
            return self._dead(stream, entry_id, deliveries, DeadReason.DUPLICATE_JOB, detail, job.job_id, job.line)
        if written != 1:
            return Outcome.DUPLICATE
        stages = {
            Stage.DECODE: decoded - started,
            Stage.SCORE: scored_at - decoded,
            Stage.WRITE_MAP: stored - scored_at,
            Stage.WRITE_RESULT: time.perf_counter() - stored,
        }
        telemetry.result_written(job.line, result.latency_ms / 1e3, stages)
        return Outcome.RESULT

    def _store_map(
        self, job: InspectionJob, image: np.ndarray, payload: bytes, scored: ScoredImage, jlog: JobLog
    ) -> tuple[str, str]:
        """Write the map and overlay (and keep the job's image bytes); returns the map's and overlay's refs."""
        objects = map_objects(job, image, scored)
        for obj in (*objects, *kept_image_objects(job, payload, self.config.keep_images)):
            self._store_call(
                f"job {job.job_id}: writing {obj.key}",
                lambda obj=obj: self.store.put_bytes(obj.key, obj.data, obj.content_type),
                jlog,
            )
        return self.store.ref(objects[0].key), self.store.ref(objects[1].key)

    # ---- the loop ---------------------------------------------------------------------------
    def _entry_log(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> JobLog:
        """A logger for an entry whose processing failed: with its job's id when the envelope has one."""
        job_id, line = peek_raw_ids(fields.get(JOB_FIELD))
        return job_log(log, job_id, line or self._line_of.get(stream), entry_id)

    def _note_failure(self, stream: str, entry_id: str, stage: str, exc: BaseException) -> None:
        """Keep why this try failed, for the dead letter if every try does; best effort (Redis may be why)."""
        try:
            text = f"{stage}: {printable(repr(exc), FAILURE_CHARS)}"
            self.redis.set(self.names.failure_marker(stream, entry_id), text, ex=self.config.progress_ttl_s)
        except redis.RedisError:
            pass

    def _last_failure(self, stream: str, entry_id: str) -> str | None:
        """Why the entry's last try failed (`_note_failure`), if that is known."""
        try:
            text = self.redis.get(self.names.failure_marker(stream, entry_id))
        except redis.RedisError:
            return None
        return text.decode(errors="replace") if text is not None else None

    def _run_one(self, entry: Entry) -> Outcome:
        stream, entry_id, fields, deliveries = entry
        try:
            outcome = self.process_entry(stream, entry_id, fields, deliveries)
        except redis.RedisError as exc:  # Redis stayed away past redis_retry_s
            self._entry_log(stream, entry_id, fields).warning("entry %s: redis error, left pending: %r", entry_id, exc)
            self._note_failure(stream, entry_id, "reaching Redis", exc)
            outcome = Outcome.RETRY
        except Exception as exc:  # a bug must not stop the consumer; the entry is retried, then dead-lettered
            self._entry_log(stream, entry_id, fields).exception("entry %s: unexpected error, left pending", entry_id)
            self._note_failure(stream, entry_id, "with an unexpected error", exc)
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
            failure = self._last_failure(stream, entry_id)
            if failure:
                detail += f"; the last try failed {failure}"
            return self._dead(stream, entry_id, deliveries, DeadReason.TRIMMED, detail, job_id, line, retry_s)
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
        for stream, line in self._line_of.items():
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
        backoff = self._backoff()
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
                with self._lock:  # while a job waits for Serve to take it, take nothing new
                    limit = 0 if self._waiting_for_capacity else self.intake.current
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
