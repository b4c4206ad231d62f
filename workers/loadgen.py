"""An open-loop load generator: a simulated camera fleet that publishes on a fixed clock.

Unlike `workers.fleet.CameraFleet` (closed loop, one job in flight per camera), every camera here
publishes at ``fps`` frames per second whether or not its earlier jobs were answered, as a real line
does, so a service slower than the offered rate builds a backlog and shows it in the latency.

    schedule = publish_schedule(cameras=8, fps=2.0, duration_s=30.0)   # 8 lists of 60 offsets (s)
    pools = camera_images(cameras=8, size=128, pool=4, defect_share=0.5)  # PNG bytes, made up front
    gen = LoadGenerator(client, names, store=None, line="default", pools=pools, run_id="a1b2c3d4")
    summary = gen.run(schedule, fps=2.0, duration_s=30.0, grace_s=60.0, on_progress=print)
    summary.as_dict()["achieved_equals_offered"]

Due times are offsets from one start instant (``n / fps`` plus a per-camera stagger of
``camera / (fps · cameras)``), never "sleep after send", so the schedule does not drift; one thread
sleeps until the earliest due time across cameras (a heap) and records how late each publish was.
Job ids are ``loadgen-<run>-<camera>-<n>``; results and dead letters are read with XREAD cursors
taken before the first publish. A frame the line refuses (`LineBacklogFull`: its stream is at its cap
with nothing answered to trim) is counted as ``refused`` and the run goes on, as a camera that drops a
frame would; such a run does not have achieved == offered.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from schemas import DeadLetter, InspectionJob, InspectionResult, StreamNames
from trainer.imaging import encode_png
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind, synth_image
from workers.consumer_config import REDIS_TRANSIENT
from workers.publisher import DEFAULT_JOBS_MAXLEN, LineBacklogFull, publish_by_reference, publish_job
from workers.results import read_answer
from workers.retry import Backoff

log = logging.getLogger("anomap.loadgen")

JOB_PREFIX = "loadgen"
_DEFECT_CYCLE = tuple(DefectKind)


def frames_per_camera(fps: float, duration_s: float) -> int:
    """How many frames one camera sends in ``duration_s`` at ``fps`` (``floor(fps · duration_s)``)."""
    if fps <= 0 or duration_s <= 0:
        msg = f"fps and duration_s must be > 0, got fps={fps}, duration_s={duration_s}"
        raise ValueError(msg)
    return math.floor(fps * duration_s + 1e-9)


def publish_schedule(cameras: int, fps: float, duration_s: float) -> list[list[float]]:
    """Each camera's due times in seconds after the start: ``n / fps + camera / (fps · cameras)``.

    Cameras are staggered evenly across one frame period so that they do not all publish at once;
    every offset lies in ``[0, duration_s)``.
    """
    if cameras < 1:
        msg = f"cameras must be >= 1, got {cameras}"
        raise ValueError(msg)
    frames = frames_per_camera(fps, duration_s)
    period = 1.0 / fps
    return [[n * period + camera * period / cameras for n in range(frames)] for camera in range(cameras)]


def due_order(schedule: Sequence[Sequence[float]]) -> Iterator[tuple[float, int, int]]:
    """``(due_s, camera, n)`` across all cameras, earliest first, one heap entry per camera."""
    heap = [(times[0], camera, 0) for camera, times in enumerate(schedule) if times]
    heapq.heapify(heap)
    while heap:
        due, camera, n = heapq.heappop(heap)
        yield due, camera, n
        if n + 1 < len(schedule[camera]):
            heapq.heappush(heap, (schedule[camera][n + 1], camera, n + 1))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) with linear interpolation between ranks; None when empty."""
    if not 0 <= q <= 100:
        msg = f"q must be in [0, 100], got {q}"
        raise ValueError(msg)
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def camera_id(camera: int) -> str:
    """``cam00``, ``cam01``, ..."""
    return f"cam{camera:02d}"


def job_id(run_id: str, camera: int, n: int) -> str:
    """``loadgen-<run>-<camera>-<n>``, e.g. ``loadgen-a1b2c3d4-cam03-000012``."""
    return f"{JOB_PREFIX}-{run_id}-{camera_id(camera)}-{n:06d}"


def defect_plan(pool: int, defect_share: float) -> list[tuple[DefectKind, ...]]:
    """Defects of each image in a camera's pool: ``round(pool · defect_share)`` of them get one kind.

    Defective images are spread evenly through the pool and cycle through the defect kinds.
    """
    if not 0 <= defect_share <= 1:
        msg = f"defect_share must be in [0, 1], got {defect_share}"
        raise ValueError(msg)
    plan: list[tuple[DefectKind, ...]] = []
    drawn = 0
    for k in range(pool):
        if math.floor((k + 1) * defect_share + 1e-9) > math.floor(k * defect_share + 1e-9):
            plan.append((_DEFECT_CYCLE[drawn % len(_DEFECT_CYCLE)],))
            drawn += 1
        else:
            plan.append(())
    return plan


def camera_images(
    cameras: int, size: int, pool: int = 4, defect_share: float = 0.5, seed: int = 0
) -> list[list[bytes]]:
    """``pool`` distinct synthetic brushed-metal PNGs per camera, each from its own seed."""
    if pool < 1:
        msg = f"pool must be >= 1, got {pool}"
        raise ValueError(msg)
    plan = defect_plan(pool, defect_share)
    return [
        [encode_png(synth_image(seed + camera * pool + k, size, plan[k])[0]) for k in range(pool)]
        for camera in range(cameras)
    ]


@dataclass(frozen=True)
class LoadProgress:
    """A snapshot while the load runs."""

    elapsed_s: float
    offered: int
    planned: int
    results: int
    dead_letters: int
    p50_latency_ms: float | None
    max_lag_ms: float
    refused: int = 0

    @property
    def achieved_rate(self) -> float:
        """Results per second so far."""
        return self.results / self.elapsed_s if self.elapsed_s > 0 else 0.0


def progress_line(p: LoadProgress) -> str:
    """One line of live progress, e.g. ``12.0 s  offered 96/240  answered 90  dead 0  7.5/s  p50 41 ms``
    (and ``refused N`` once the line has refused a frame)."""
    p50 = "-" if p.p50_latency_ms is None else f"{p.p50_latency_ms:.0f} ms"
    refused = f"  refused {p.refused}" if p.refused else ""
    return (
        f"{p.elapsed_s:6.1f} s  offered {p.offered}/{p.planned}{refused}  answered {p.results}  "
        f"dead {p.dead_letters}  {p.achieved_rate:.1f}/s  p50 {p50}  max lag {p.max_lag_ms:.0f} ms"
    )


@dataclass(frozen=True)
class LoadSummary:
    """What one load run offered and got back; `as_dict` is the ``--json`` document."""

    cameras: int
    fps: float
    duration_s: float
    offered: int
    publish_window_s: float
    results: int
    dead_letters: int
    span_s: float
    """The publishing window plus the drain: from the start to the last answer (or to the end of the
    grace period when answers are missing), never shorter than ``publish_window_s``."""
    latencies_ms: tuple[float, ...]
    lags_ms: tuple[float, ...]
    by_reference: bool = False
    line: str = "default"
    run_id: str = ""
    refused: int = 0
    """Frames the line refused (`LineBacklogFull`): not published, not in ``offered``."""

    @property
    def unanswered(self) -> int:
        """Jobs offered that got neither a result nor a dead letter."""
        return max(self.offered - self.results - self.dead_letters, 0)

    @property
    def achieved_equals_offered(self) -> bool:
        """Every frame was published, and every job offered got a result and none a dead letter."""
        return self.results + self.dead_letters == self.offered and self.dead_letters == 0 and self.refused == 0

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain JSON-able values."""
        window = self.publish_window_s
        return {
            "run_id": self.run_id,
            "line": self.line,
            "by_reference": self.by_reference,
            "cameras": self.cameras,
            "fps": self.fps,
            "duration_s": self.duration_s,
            "offered": self.offered,
            "offered_rate": self.offered / window if window > 0 else 0.0,
            "refused": self.refused,
            "results": self.results,
            "dead_letters": self.dead_letters,
            "unanswered": self.unanswered,
            "span_s": self.span_s,
            "achieved_rate": self.results / self.span_s if self.span_s > 0 else 0.0,
            "latency_ms": {f"p{q}": percentile(self.latencies_ms, q) for q in (50, 95, 99)},
            "publish_lag_ms": {"p50": percentile(self.lags_ms, 50), "max": max(self.lags_ms, default=None)},
            "achieved_equals_offered": self.achieved_equals_offered,
        }


@dataclass
class _Tally:
    """Shared between the publisher, the collector and the progress loop (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    offered: set[str] = field(default_factory=set)
    lags_ms: list[float] = field(default_factory=list)
    refused: int = 0
    results: dict[str, InspectionResult] = field(default_factory=dict)
    dead: dict[str, DeadLetter] = field(default_factory=dict)
    last_publish: float = 0.0
    last_answer: float = 0.0
    publish_error: BaseException | None = None
    collect_error: BaseException | None = None


def _last_id(client: redis.Redis, stream: str) -> str:
    newest = client.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


def done_waiting(
    publishing: bool,
    answered: int,
    offered: int,
    elapsed_s: float,
    last_due_s: float,
    last_publish_s: float,
    grace_s: float,
) -> bool:
    """Whether a run stops waiting: publishing is over and every offered job is answered, or ``grace_s``
    passed since the last publish (its due time, or when it really happened if the publisher fell
    behind: a slow publisher must not eat the answers' grace). Times in seconds from the start."""
    if publishing:
        return False
    return answered >= offered or elapsed_s > max(last_due_s, last_publish_s) + grace_s


class LoadGenerator:
    """Publishes a run's jobs on schedule for several cameras on one line and counts the answers."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        store: ObjectStore | None,
        line: str,
        pools: Sequence[Sequence[bytes]],
        run_id: str,
        maxlen: int = DEFAULT_JOBS_MAXLEN,
    ) -> None:
        if not pools or any(not pool for pool in pools):
            msg = "every camera needs at least one image"
            raise ValueError(msg)
        self.client = client
        self.names = names
        self.store = store
        self.line = line
        self.pools = pools
        self.run_id = run_id
        self.maxlen = maxlen
        self._prefix = f"{JOB_PREFIX}-{run_id}-"

    def _send(self, camera: int, n: int) -> str:
        job = InspectionJob(job_id=job_id(self.run_id, camera, n), camera_id=camera_id(camera), line=self.line)
        pool = self.pools[camera]
        image = pool[n % len(pool)]
        if self.store is not None:
            publish_by_reference(self.client, self.names, self.store, job, image, maxlen=self.maxlen)
        else:
            publish_job(self.client, self.names, job, image=image, maxlen=self.maxlen)
        return job.job_id

    def _publish(
        self, schedule: Sequence[Sequence[float]], started: float, tally: _Tally, stop: threading.Event
    ) -> None:
        try:
            for due, camera, n in due_order(schedule):
                wait = started + due - time.monotonic()
                if wait > 0 and stop.wait(wait):
                    return
                lag_ms = max(time.monotonic() - started - due, 0.0) * 1e3
                try:
                    sent = self._send(camera, n)
                except LineBacklogFull as exc:  # the camera drops this frame; the line said why
                    with tally.lock:
                        tally.refused += 1
                        first = tally.refused == 1
                    if first:
                        log.warning("loadgen: %s", exc)
                    continue
                with tally.lock:
                    tally.offered.add(sent)
                    tally.lags_ms.append(lag_ms)
                    tally.last_publish = time.monotonic()
        except BaseException as exc:  # reported by run(), which stops waiting for answers
            tally.publish_error = exc

    def _collect(self, cursors: dict[str, str], tally: _Tally, stop: threading.Event) -> None:
        dead_stream = self.names.dead
        backoff = Backoff(0.1, 2.0)
        try:
            while not stop.is_set():
                try:
                    reply = self.client.xread(cursors, block=200, count=500)
                except REDIS_TRANSIENT as exc:  # Redis away for a moment: the answers wait in the streams
                    log.warning("loadgen: reading answers failed (%r); retrying", exc)
                    stop.wait(backoff.next_delay())
                    continue
                backoff.reset()
                for stream, items in reply or []:
                    name = stream.decode()
                    for entry_id, fields in items:
                        cursors[name] = entry_id.decode()
                        self._record(name == dead_stream, fields, tally)
        except BaseException as exc:  # reported by run(), which stops waiting for answers
            tally.collect_error = exc

    def _record(self, is_dead: bool, fields: dict[bytes, bytes], tally: _Tally) -> None:
        try:
            answer = read_answer(is_dead, fields)
        except ValueError as exc:  # another writer's entry (another version's, say): not one of ours
            log.debug("loadgen: skipped an entry it cannot read: %r", exc)
            return
        if isinstance(answer, DeadLetter):
            letter = answer
            if letter.job_id is None or not letter.job_id.startswith(self._prefix):
                return
            with tally.lock:
                tally.dead.setdefault(letter.job_id, letter)
                tally.last_answer = time.monotonic()
            return
        result = answer
        if not result.job_id.startswith(self._prefix):
            return
        with tally.lock:
            tally.results.setdefault(result.job_id, result)
            tally.last_answer = time.monotonic()

    def run(
        self,
        schedule: Sequence[Sequence[float]],
        fps: float,
        duration_s: float,
        grace_s: float = 60.0,
        on_progress: Callable[[LoadProgress], None] | None = None,
        progress_every_s: float = 0.5,
    ) -> LoadSummary:
        """Publish on ``schedule``, then wait up to ``grace_s`` for the answers after the last publish (its due
        time, or later when publishing fell behind)."""
        planned = sum(len(times) for times in schedule)
        last_due = max((times[-1] for times in schedule if times), default=0.0)
        cursors = {s: _last_id(self.client, s) for s in (self.names.results(self.line), self.names.dead)}
        tally, stop = _Tally(), threading.Event()
        collector = threading.Thread(target=self._collect, args=(cursors, tally, stop), name="loadgen-collect")
        collector.start()
        started = time.monotonic()
        publisher = threading.Thread(
            target=self._publish, args=(schedule, started, tally, stop), name="loadgen-publish"
        )
        publisher.start()
        try:
            while True:
                publishing = publisher.is_alive()  # before the snapshot, so a last publish is in it
                snapshot = self._progress(tally, started, planned)
                if on_progress is not None:
                    on_progress(snapshot)
                with tally.lock:
                    answered = len((tally.results.keys() | tally.dead.keys()) & tally.offered)
                    last_publish_s = tally.last_publish - started if tally.last_publish else 0.0
                if tally.publish_error is not None or tally.collect_error is not None:
                    break
                elapsed = time.monotonic() - started
                if done_waiting(publishing, answered, snapshot.offered, elapsed, last_due, last_publish_s, grace_s):
                    break
                time.sleep(progress_every_s)
        finally:
            stop.set()
            publisher.join()
            collector.join()
        if tally.publish_error is not None:
            raise tally.publish_error
        if tally.collect_error is not None:
            raise tally.collect_error
        ended = time.monotonic()
        with tally.lock:
            offered = set(tally.offered)
            results = [r for job, r in tally.results.items() if job in offered]
            dead = [d for job, d in tally.dead.items() if job in offered]
            complete = len({r.job_id for r in results} | {d.job_id for d in dead if d.job_id}) >= len(offered)
            finished = tally.last_answer if complete and tally.last_answer else ended
            window = max(duration_s, tally.last_publish - started)
            return LoadSummary(
                cameras=len(schedule),
                fps=fps,
                duration_s=duration_s,
                offered=len(offered),
                publish_window_s=window,
                results=len(results),
                dead_letters=len(dead),
                span_s=max(finished - started, window),
                latencies_ms=tuple(r.latency_ms for r in results),
                lags_ms=tuple(tally.lags_ms),
                by_reference=self.store is not None,
                line=self.line,
                run_id=self.run_id,
                refused=tally.refused,
            )

    def _progress(self, tally: _Tally, started: float, planned: int) -> LoadProgress:
        with tally.lock:
            latencies = [r.latency_ms for r in tally.results.values()]
            return LoadProgress(
                elapsed_s=time.monotonic() - started,
                offered=len(tally.offered),
                planned=planned,
                results=len(tally.results),
                dead_letters=len(tally.dead),
                p50_latency_ms=percentile(latencies, 50),
                max_lag_ms=max(tally.lags_ms, default=0.0),
                refused=tally.refused,
            )
