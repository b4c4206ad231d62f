"""`EntryProcessor`: one delivered job entry to its end — a result, a dead letter, or left pending for a retry.

What `StreamConsumer` runs for each entry it reads (in a worker thread, several at once):

1. An entry gone from its stream, or delivered more than ``max_deliveries`` times, is answered with a dead
   letter at once; so is a bad job (schema, image, missing or forbidden object, a job on another line's
   stream), with its `DeadReason`.
2. A good job is taken (one Lua script reads its done marker and takes its owner marker), scored, its
   map and overlay are written, and only then one Lua script adds the result, sets the job's done
   marker and acknowledges the entry (`workers.stream_scripts`).
3. Servers that are away are waited for in the job's own thread, with capped exponential backoff:
   the object store up to ``store_retry_s``, Redis up to ``redis_retry_s``, a failing Serve call
   up to ``score_retry_s``. Only then is the entry left pending (``Outcome.RETRY``), why noted for
   its dead letter should every try fail.
4. Serve refusing a job for backpressure (`ScoringBusy`) is not a failure: the job waits (jittered
   backoff, capped at ``busy_backoff_max_s``) and is sent again for as long as that lasts; meanwhile
   ``waiting_for_capacity`` tells the consumer to read nothing new, and its `IntakeLimit` is halved at
   each refusal and grows back by one per job scored.

A set ``abort`` event (the consumer's drain ran out of time) cuts every wait short.

    processor = EntryProcessor(redis, store, inspector, StreamNames(), config, ConsumerStats(), intake, abort)
    processor.process_entry("anomap:jobs", "1-0", fields, deliveries=1)      # Outcome.RESULT
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import redis

from schemas import DeadLetter, DeadReason, InspectionJob, JobRejected, StreamNames
from schemas.envelope import peek_raw_ids, printable
from schemas.ids import parse_s3_ref
from schemas.stream import JOB_FIELD, decode_job_entry, entry_marker, parse_entry_marker
from trainer.imaging import ImageRejected, decode_image
from trainer.store import ObjectForbidden, ObjectMissing, ObjectStore, ObjectTooLarge, describe_store_error
from workers import telemetry
from workers.consumer_config import REDIS_TRANSIENT, ConsumerConfig, ConsumerStats, Outcome
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


def describe_entry(marker: str) -> str:
    """``"entry 1-0 of anomap:jobs"`` for an owner or done marker's value (``"entry 1-0"`` for a bare id)."""
    stream, entry_id = parse_entry_marker(marker)
    return f"entry {entry_id} of {stream}" if stream else f"entry {entry_id}"


def consumer_backoff(config: ConsumerConfig) -> Backoff:
    """A fresh capped exponential backoff with ``config``'s initial delay, cap and jitter."""
    return Backoff(config.backoff_initial_s, config.backoff_max_s, config.backoff_jitter)


class EntryProcessor:
    """Handles the entries of one consumer's job streams (``config.lines``); thread-safe."""

    def __init__(
        self,
        client: redis.Redis,
        store: ObjectStore,
        inspector: Inspector,
        names: StreamNames,
        config: ConsumerConfig,
        stats: ConsumerStats,
        intake: IntakeLimit,
        abort: threading.Event,
    ) -> None:
        self.redis = client
        self.store = store
        self.inspector = inspector
        self.names = names
        self.config = config
        self.stats = stats
        self.intake = intake
        self.abort = abort
        self.line_of = {names.jobs(line): line for line in config.lines}  # job stream -> its line
        self._commit_result = client.register_script(COMMIT_RESULT)
        self._commit_dead = client.register_script(COMMIT_DEAD)
        self._take_job = client.register_script(TAKE_JOB)
        self._lock = threading.Lock()
        self._waiting_for_capacity = 0  # jobs refused for backpressure, not yet accepted; under _lock

    @property
    def waiting_for_capacity(self) -> int:
        """Jobs waiting for Serve to take them (refused for backpressure, not yet accepted)."""
        with self._lock:
            return self._waiting_for_capacity

    def entry_log(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> JobLog:
        """A logger for an entry whose processing failed: with its job's id when the envelope has one."""
        job_id, line = peek_raw_ids(fields.get(JOB_FIELD))
        return job_log(log, job_id, line or self.line_of.get(stream), entry_id)

    # ---- retrying ---------------------------------------------------------------------------
    def _redis_call(
        self, what: str, op: Callable[[], T], jlog: JobLog | None = None, limit_s: float | None = None
    ) -> T:
        return retry_call(
            op,
            transient=REDIS_TRANSIENT,
            limit_s=self.config.redis_retry_s if limit_s is None else limit_s,
            abort=self.abort,
            what=what,
            backoff=consumer_backoff(self.config),
            log_fields=jlog.fields if jlog is not None else None,
        )

    def _store_call(self, what: str, op: Callable[[], T], jlog: JobLog) -> T:
        return retry_call(
            op,
            transient=(Exception,),  # connection refused, timeouts, 5xx: not a missing, forbidden or oversized object
            permanent=(ObjectMissing, ObjectForbidden, ObjectTooLarge),
            limit_s=self.config.store_retry_s,
            abort=self.abort,
            what=what,
            backoff=consumer_backoff(self.config),
            log_fields=jlog.fields,
        )

    def dead(
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
        line = line or self.line_of.get(stream)
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
            args.append(entry_marker(stream, entry_id))
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
                        abort=self.abort,
                        what=f"job {job.job_id}: scoring",
                        backoff=consumer_backoff(self.config),
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
                    if self.abort.wait(delay):  # the drain ran out of time: leave the entry pending
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
        telemetry.job_read(self.line_of.get(stream, "unknown"))
        if not fields:
            detail = "the entry was trimmed from its stream (MAXLEN) or deleted while pending: its job is gone"
            return self.dead(stream, entry_id, deliveries, DeadReason.TRIMMED, detail)
        if deliveries > self.config.max_deliveries:  # before anything else, so that no failure repeats forever
            job_id, line = peek_raw_ids(fields.get(JOB_FIELD))
            detail = f"delivered {deliveries} times (limit {self.config.max_deliveries}) without a result"
            failure = self.last_failure(stream, entry_id)
            if failure:
                detail += f"; the last try failed {failure}"
            return self.dead(stream, entry_id, deliveries, DeadReason.TOO_MANY_DELIVERIES, detail, job_id, line)
        try:
            job, inline = decode_job_entry(fields)
        except JobRejected as exc:
            return self.dead(stream, entry_id, deliveries, exc.reason, exc.detail, exc.job_id)
        stream_line = self.line_of.get(stream, job.line)
        if job.line != stream_line:  # it would be scored with another line's model, its result sent there
            detail = f"the job names line {job.line!r} but is on {stream}, the stream of line {stream_line!r}"
            return self.dead(stream, entry_id, deliveries, DeadReason.INVALID_ENTRY, detail, job.job_id, stream_line)
        jlog = job_log(log, job.job_id, job.line, entry_id)
        mine = entry_marker(stream, entry_id)
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
            return self.dead(stream, entry_id, deliveries, DeadReason.DUPLICATE_JOB, detail, job.job_id, job.line)
        if kind == "owner" and marker != mine:
            detail = f"job_id is being scored from {describe_entry(marker)}"
            return self.dead(stream, entry_id, deliveries, DeadReason.DUPLICATE_JOB, detail, job.job_id, job.line)
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
            return self.dead(stream, entry_id, deliveries, exc.reason, exc.detail, job.job_id, job.line)
        except Exception as exc:  # the store stayed away past store_retry_s
            jlog.warning("job %s: reading its image failed, left pending: %r", job.job_id, exc)
            self.note_failure(stream, entry_id, "reading its image", exc)
            return Outcome.RETRY
        decoded = time.perf_counter()
        try:
            scored = self._score(job, image, jlog)
        except Exception as exc:  # Serve stayed broken past score_retry_s: leave pending, retry later
            jlog.warning("job %s: scoring failed (delivery %d), left pending: %r", job.job_id, deliveries, exc)
            self.note_failure(stream, entry_id, "scoring", exc)
            return Outcome.RETRY
        scored_at = time.perf_counter()
        try:
            map_ref, overlay_ref = self._store_map(job, image, payload, scored, jlog)
        except Exception as exc:  # the store stayed away past store_retry_s
            jlog.warning("job %s: storing the map failed, left pending: %s", job.job_id, describe_store_error(exc))
            self.note_failure(stream, entry_id, "storing the map", exc)
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
                    entry_marker(stream, entry_id),
                ],
            ),
            jlog,
        )
        if written == DONE_BY_ANOTHER_ENTRY:  # its owner marker had expired: the same id scored twice at once
            detail = f"job_id already has a result from {self._result_entry(job, jlog) or 'an entry (expired)'}"
            return self.dead(stream, entry_id, deliveries, DeadReason.DUPLICATE_JOB, detail, job.job_id, job.line)
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

    def note_failure(self, stream: str, entry_id: str, stage: str, exc: BaseException) -> None:
        """Keep why this try failed, for the dead letter if every try does; best effort (Redis may be why)."""
        try:
            text = f"{stage}: {printable(describe_store_error(exc), FAILURE_CHARS)}"
            self.redis.set(self.names.failure_marker(stream, entry_id), text, ex=self.config.progress_ttl_s)
        except redis.RedisError:
            pass

    def last_failure(self, stream: str, entry_id: str) -> str | None:
        """Why the entry's last try failed (`_note_failure`), if that is known."""
        try:
            text = self.redis.get(self.names.failure_marker(stream, entry_id))
        except redis.RedisError:
            return None
        return text.decode(errors="replace") if text is not None else None
