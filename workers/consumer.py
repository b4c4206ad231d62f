"""`StreamConsumer`: jobs from Redis Streams → Serve → object store → results stream.

At-least-once delivery, exactly one result per job:

1. On start it drains its own pending list (entries it read before a crash), then reads new ones
   (``XREADGROUP >``) with at most ``max_in_flight`` jobs in flight.
2. Entries idle in any consumer's pending list past ``claim_idle_ms`` are reclaimed
   (``XAUTOCLAIM``); an entry delivered more than ``max_deliveries`` times becomes a dead letter.
3. A bad job (schema, image, missing object) becomes a dead letter with a `DeadReason`.
4. A good job is scored, its map and overlay are written, and only then one Lua script adds the
   result, sets the job's done marker and acknowledges the entry. A failure before that leaves the
   entry pending, to be retried after ``claim_idle_ms``.

    consumer = StreamConsumer(redis, store, inspector, StreamNames(), ConsumerConfig(consumer="c1"))
    consumer.run(stop_event)
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import numpy as np
import redis

from schemas import DeadLetter, DeadReason, InspectionJob, InspectionResult, JobRejected, StreamNames
from schemas.stream import decode_job_entry
from trainer.imaging import ImageRejected, decode_image, encode_png
from trainer.store import ObjectMissing, ObjectStore
from workers.inspection import Inspector, ScoredImage
from workers.maps import encode_map, map_keys
from workers.overlay import render_overlay
from workers.stream_scripts import COMMIT_DEAD, COMMIT_RESULT

log = logging.getLogger("anomap.consumer")


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


@dataclass
class ConsumerStats:
    """Counts of outcomes since the consumer started."""

    outcomes: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))

    def add(self, outcome: Outcome) -> None:
        """Count one outcome."""
        self.outcomes[outcome] += 1


Entry = tuple[str, str, dict[bytes, bytes], int]  # (stream, entry id, fields, delivery count)


def _now() -> datetime:
    return datetime.now(UTC)


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
        self._streams = [names.jobs(line) for line in config.lines]
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()

    # ---- group management -------------------------------------------------------------------
    def ensure_groups(self) -> None:
        """Create the consumer group on every job stream (and the stream) if missing."""
        for stream in self._streams:
            try:
                self.redis.xgroup_create(stream, self.names.scorer_group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _done_key(self, job_id: str) -> str:
        return f"{self.names.prefix}:done:{job_id}"

    # ---- reading ----------------------------------------------------------------------------
    def _own_pending(self) -> list[Entry]:
        entries: list[Entry] = []
        for stream in self._streams:
            reply = self.redis.xreadgroup(self.names.scorer_group, self.config.consumer, {stream: "0"}, count=1000)
            for _, items in reply or []:
                for entry_id, fields in items:
                    eid = entry_id.decode()
                    if fields:
                        entries.append((stream, eid, fields, self._deliveries(stream, eid)))
                    else:  # trimmed away while pending: nothing left to score
                        self.redis.xack(stream, self.names.scorer_group, eid)
        return entries

    def _deliveries(self, stream: str, entry_id: str) -> int:
        info = self.redis.xpending_range(stream, self.names.scorer_group, min=entry_id, max=entry_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    def _claim(self, limit: int) -> list[Entry]:
        entries: list[Entry] = []
        for stream in self._streams:
            reply = self.redis.xautoclaim(
                stream,
                self.names.scorer_group,
                self.config.consumer,
                min_idle_time=self.config.claim_idle_ms,
                start_id="0-0",
                count=limit,
            )
            claimed = reply[1] if len(reply) > 1 else []
            for entry_id, fields in claimed:
                eid = entry_id.decode()
                if eid in self._in_flight:
                    continue
                if fields:
                    entries.append((stream, eid, fields, self._deliveries(stream, eid)))
            for eid in reply[2] if len(reply) > 2 else []:  # deleted while pending
                self.redis.xack(stream, self.names.scorer_group, eid)
        return entries

    def _read_new(self, limit: int, block_ms: int) -> list[Entry]:
        reply = self.redis.xreadgroup(
            self.names.scorer_group,
            self.config.consumer,
            dict.fromkeys(self._streams, ">"),
            count=limit,
            block=block_ms,
        )
        entries: list[Entry] = []
        for stream, items in reply or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            entries.extend((name, entry_id.decode(), fields, 1) for entry_id, fields in items)
        return entries

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
    ) -> Outcome:
        letter = DeadLetter(
            entry_id=entry_id,
            stream=stream,
            job_id=job_id,
            line=line,
            reason=reason,
            detail=detail[:2000],
            delivery_count=max(deliveries, 1),
        )
        self._commit_dead(
            keys=[self.names.dead, stream],
            args=[entry_id, self.names.scorer_group, self.config.dead_maxlen, letter.model_dump_json()],
        )
        log.warning("job %s (entry %s) → dead letter: %s: %s", job_id, entry_id, reason.value, detail[:200])
        return Outcome.DEAD

    def _fetch_image(self, job: InspectionJob, inline: bytes | None) -> bytes:
        if inline is not None:
            return inline
        assert job.image_ref is not None  # decode_job_entry guarantees one of them
        bucket, key = job.image_ref.removeprefix("s3://").split("/", 1)
        try:
            return self.store.get_bytes(key, bucket=bucket)
        except ObjectMissing as exc:
            raise JobRejected(DeadReason.MISSING_OBJECT, f"{job.image_ref} does not exist", job.job_id) from exc

    def process_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> Outcome:
        """Handle one delivered entry to its end: a result, a dead letter, or left for retry."""
        try:
            job, inline = decode_job_entry(fields)
        except JobRejected as exc:
            return self._dead(stream, entry_id, deliveries, exc.reason, exc.detail, exc.job_id)
        done = self.redis.get(self._done_key(job.job_id))
        if done is not None:
            if done.decode() == entry_id:
                self.redis.xack(stream, self.names.scorer_group, entry_id)
                return Outcome.DUPLICATE
            return self._dead(
                stream,
                entry_id,
                deliveries,
                DeadReason.DUPLICATE_JOB,
                f"job_id already has a result from entry {done.decode()}",
                job.job_id,
                job.line,
            )
        if deliveries > self.config.max_deliveries:
            return self._dead(
                stream,
                entry_id,
                deliveries,
                DeadReason.TOO_MANY_DELIVERIES,
                f"delivered {deliveries} times (limit {self.config.max_deliveries}) without a result",
                job.job_id,
                job.line,
            )
        started = time.perf_counter()
        try:
            image = decode_image(self._fetch_image(job, inline))
        except JobRejected as exc:
            return self._dead(stream, entry_id, deliveries, exc.reason, exc.detail, job.job_id, job.line)
        except ImageRejected as exc:
            return self._dead(stream, entry_id, deliveries, exc.reason, exc.detail, job.job_id, job.line)
        decoded = time.perf_counter()
        try:
            scored = self.inspector(image, job.pixel_threshold)
        except Exception as exc:  # Serve replica died, timeout…: leave pending, retry later
            log.warning("job %s: scoring failed (delivery %d), will retry: %r", job.job_id, deliveries, exc)
            return Outcome.RETRY
        scored_at = time.perf_counter()
        try:
            map_ref, overlay_ref = self._store_map(job, image, scored)
        except Exception as exc:  # object store down: leave pending, retry later
            log.warning("job %s: storing the map failed, will retry: %r", job.job_id, exc)
            return Outcome.RETRY
        stored = time.perf_counter()
        result = self._result(
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
        written = self._commit_result(
            keys=[self._done_key(job.job_id), self.names.results(job.line), stream],
            args=[
                entry_id,
                self.names.scorer_group,
                self.config.done_ttl_s,
                self.config.results_maxlen,
                result.model_dump_json(),
            ],
        )
        return Outcome.RESULT if written == 1 else Outcome.DUPLICATE

    def _store_map(self, job: InspectionJob, image: np.ndarray, scored: ScoredImage) -> tuple[str, str]:
        npz_key, png_key = map_keys(job)
        self.store.put_bytes(npz_key, encode_map(scored.anomaly_map))
        overlay = render_overlay(image, scored.anomaly_map, scored.pixel_threshold)
        self.store.put_bytes(png_key, encode_png(overlay), "image/png")
        return self.store.ref(npz_key), self.store.ref(png_key)

    @staticmethod
    def _result(
        job: InspectionJob, scored: ScoredImage, map_ref: str, overlay_ref: str, stage_ms: dict[str, float]
    ) -> InspectionResult:
        summary = scored.summary
        now = _now()
        return InspectionResult(
            job_id=job.job_id,
            camera_id=job.camera_id,
            line=job.line,
            model_version=scored.model_version,
            width=scored.anomaly_map.shape[1],
            height=scored.anomaly_map.shape[0],
            image_score=summary.image_score,
            raw_image_score=summary.raw_image_score,
            is_anomalous=summary.is_anomalous,
            pixel_threshold=scored.pixel_threshold,
            image_threshold=scored.image_threshold,
            regions=summary.regions,
            regions_truncated=summary.regions_truncated,
            map_ref=map_ref,
            overlay_ref=overlay_ref,
            captured_at=job.captured_at,
            published_at=job.published_at,
            scored_at=now,
            latency_ms=max((now - job.published_at).total_seconds() * 1e3, 0.0),
            stage_ms=stage_ms,
        )

    # ---- the loop ---------------------------------------------------------------------------
    def _run_one(self, entry: Entry) -> Outcome:
        stream, entry_id, fields, deliveries = entry
        try:
            return self.process_entry(stream, entry_id, fields, deliveries)
        except redis.RedisError as exc:
            log.warning("entry %s: redis error, will retry: %r", entry_id, exc)
            return Outcome.RETRY
        except Exception:  # a bug must not stop the consumer; the entry is retried, then dead-lettered
            log.exception("entry %s: unexpected error, will retry", entry_id)
            return Outcome.RETRY
        finally:
            with self._lock:
                self._in_flight.discard(entry_id)

    def run(self, stop: threading.Event) -> ConsumerStats:
        """Consume until ``stop`` is set, then finish the jobs in flight (graceful drain)."""
        self.ensure_groups()
        backlog = self._own_pending()
        last_claim = 0.0
        backoff = 0.1
        futures: set[Future[Outcome]] = set()
        with ThreadPoolExecutor(self.config.max_in_flight, thread_name_prefix=self.config.consumer) as pool:
            while not stop.is_set():
                try:
                    capacity = self.config.max_in_flight - len(futures)
                    entries: list[Entry] = []
                    if capacity > 0:
                        if backlog:
                            entries, backlog = backlog[:capacity], backlog[capacity:]
                        elif time.monotonic() - last_claim > self.config.claim_every_s:
                            last_claim = time.monotonic()
                            entries = self._claim(capacity)
                        if not entries:
                            block = 20 if futures else self.config.block_ms
                            entries = self._read_new(capacity, block)
                    backoff = 0.1
                except redis.RedisError as exc:
                    log.warning(
                        "consumer %s: redis unavailable (%r); retrying in %.1fs", self.config.consumer, exc, backoff
                    )
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                for entry in entries:
                    with self._lock:
                        self._in_flight.add(entry[1])
                    futures.add(pool.submit(self._run_one, entry))
                if futures:
                    done, futures_left = wait(
                        futures, timeout=0.05 if entries or capacity > 0 else 1.0, return_when=FIRST_COMPLETED
                    )
                    futures = set(futures_left)
                    for future in done:
                        self.stats.add(future.result())
            for future in futures:
                self.stats.add(future.result())
        return self.stats
