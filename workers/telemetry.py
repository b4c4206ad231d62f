"""Prometheus metrics of the inspection service, recorded through Ray's metrics API (`ray.util.metrics`).

Every Ray process (a driver such as ``anomap serve``, a Serve replica) sends what it records to its
node's metrics agent, which serves it for Prometheus at ``http://<node>:<metrics export port>/metrics``
(the embedded stack records that URL: ``anomap stack status``). Ray exports the names below with a
``ray_`` prefix and counters with a ``_total`` suffix, and adds its own labels (``WorkerId``,
``NodeAddress``, ``SessionName``…); a worker reports every ``metrics_report_interval_ms`` (10 s by
default)::

    ray_anomap_jobs_total{line="default",…} 48.0
    ray_anomap_latency_seconds_bucket{line="default",le="0.5",…} 40.0
    ray_anomap_model_info{deployment="InspectionService",model_version="20260101-1200-ab12",…} 1.0

| recorded as | kind | tags | what |
|---|---|---|---|
| ``anomap_jobs`` | counter | line | job entries a consumer took up (redeliveries count again) |
| ``anomap_results`` | counter | line | results written |
| ``anomap_dead_letters`` | counter | line, reason | dead letters written, by `DeadReason` |
| ``anomap_backpressure`` | counter | line | times Serve refused a job because its queue was full |
| ``anomap_latency_seconds`` | histogram | line | job published → its result written |
| ``anomap_stage_seconds`` | histogram | line, stage | per `Stage`: decode, score, write_map, write_result |
| ``anomap_patch_batch_size`` | histogram | — | patches per ``@serve.batch`` call of a ``PatchScorer`` |
| ``anomap_stream_lag`` | gauge | line | job entries not yet delivered to the consumer group |
| ``anomap_stream_pending`` | gauge | line | job entries delivered but not yet acknowledged |
| ``anomap_model_info`` | gauge (= 1) | model_version, deployment | versions a replica scores with (0: retired) |

Recording is a no-op in a process where Ray is not initialised (a consumer tested without Ray, a
benchmark): the instruments are made once per process, on the first record after ``ray.init``, and
importing this module never imports Ray.

    telemetry.job_read("default")
    telemetry.result_written("default", latency_s=0.42, stage_s={Stage.SCORE: 0.3})
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds (s) of the latency histograms' buckets: 10 ms to 5 min."""
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
"""Upper bounds of the patch batch size histogram's buckets (patches)."""
INFO_REFRESH_S = 5.0
"""How often ``anomap_model_info`` is set again: Ray's metrics agent drops a gauge series that was not
reported for two report intervals, so a value set once would vanish."""


class Stage(StrEnum):
    """The steps of one job in a consumer, timed by ``anomap_stage_seconds``."""

    DECODE = "decode"
    """Fetching the image (inline or from the store) and decoding it."""
    SCORE = "score"
    """The Serve call: tiling, patch batches on the scorers, stitching."""
    WRITE_MAP = "write_map"
    """Writing the anomaly map and overlay to the store."""
    WRITE_RESULT = "write_result"
    """The Lua commit: result entry, done marker, acknowledgement."""


@dataclass(frozen=True)
class _Instruments:
    """Ray metric objects, made once per process."""

    jobs: Counter
    results: Counter
    dead_letters: Counter
    backpressure: Counter
    latency: Histogram
    stage: Histogram
    batch_size: Histogram
    lag: Gauge
    pending: Gauge
    model: Gauge

    @classmethod
    def create(cls) -> _Instruments:
        from ray.util.metrics import Counter, Gauge, Histogram

        line = ("line",)
        return cls(
            jobs=Counter("anomap_jobs", "Job entries a consumer took up (redeliveries count again).", line),
            results=Counter("anomap_results", "Results written.", line),
            dead_letters=Counter("anomap_dead_letters", "Dead letters written, by reason.", ("line", "reason")),
            backpressure=Counter("anomap_backpressure", "Jobs Serve refused because its queue was full.", line),
            latency=Histogram(
                "anomap_latency_seconds", "Job published -> result written (s).", list(LATENCY_BUCKETS_S), line
            ),
            stage=Histogram(
                "anomap_stage_seconds",
                "Time of one step of a job in a consumer (s), by stage.",
                list(LATENCY_BUCKETS_S),
                ("line", "stage"),
            ),
            batch_size=Histogram(
                "anomap_patch_batch_size", "Patches per @serve.batch call of a PatchScorer.", list(BATCH_BUCKETS)
            ),
            lag=Gauge("anomap_stream_lag", "Job entries not yet delivered to the consumer group.", line),
            pending=Gauge("anomap_stream_pending", "Job entries delivered but not yet acknowledged.", line),
            model=Gauge(
                "anomap_model_info",
                "1 for the model version a Serve replica scores with.",
                ("model_version", "deployment"),
            ),
        )


@dataclass
class _Registry:
    """The process's instruments, made on first use once Ray is initialised, and the model versions
    its Serve replicas announce (kept alive by one daemon thread)."""

    instruments: _Instruments | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    models: set[tuple[str, str]] = field(default_factory=set)
    refresher: threading.Thread | None = None


_registry = _Registry()


def _instruments() -> _Instruments | None:
    made = _registry.instruments
    if made is not None:
        return made
    ray = sys.modules.get("ray")  # Ray cannot be initialised where it was never imported
    if ray is None or not ray.is_initialized():
        return None
    with _registry.lock:
        if _registry.instruments is None:
            _registry.instruments = _Instruments.create()
        return _registry.instruments


def enabled() -> bool:
    """Whether records go anywhere: Ray is initialised in this process."""
    return _instruments() is not None


def job_read(line: str) -> None:
    """A consumer took up one job entry of ``line``."""
    if (m := _instruments()) is not None:
        m.jobs.inc(1.0, {"line": line})


def result_written(line: str, latency_s: float, stage_s: Mapping[Stage, float]) -> None:
    """A result was written: count it, its end-to-end latency and the time of each stage."""
    if (m := _instruments()) is None:
        return
    m.results.inc(1.0, {"line": line})
    m.latency.observe(max(latency_s, 0.0), {"line": line})
    for stage, seconds in stage_s.items():
        m.stage.observe(max(seconds, 0.0), {"line": line, "stage": stage.value})


def dead_letter(line: str, reason: str) -> None:
    """A dead letter was written for a job of ``line``."""
    if (m := _instruments()) is not None:
        m.dead_letters.inc(1.0, {"line": line, "reason": reason})


def backpressure(line: str) -> None:
    """Serve refused a job of ``line`` because a queue was full."""
    if (m := _instruments()) is not None:
        m.backpressure.inc(1.0, {"line": line})


def stream_backlog(line: str, lag: int | None, pending: int) -> None:
    """The consumer group's lag (None: the server cannot tell) and pending count on ``line``'s job stream."""
    if (m := _instruments()) is None:
        return
    tags = {"line": line}
    if lag is not None:
        m.lag.set(float(lag), tags)
    m.pending.set(float(pending), tags)


def patch_batch(patches: int) -> None:
    """A ``PatchScorer`` ran one ``@serve.batch`` call of ``patches`` patches."""
    if (m := _instruments()) is not None:
        m.batch_size.observe(float(patches))


def model_serving(version: str, deployment: str) -> None:
    """A Serve replica of ``deployment`` scores with model ``version``: ``anomap_model_info`` is 1 for it
    from now until `model_retired` (set again every ``INFO_REFRESH_S`` by a daemon thread)."""
    if _instruments() is None:
        return
    with _registry.lock:
        _registry.models.add((version, deployment))
        if _registry.refresher is None:
            _registry.refresher = threading.Thread(target=_refresh_info, name="anomap-model-info", daemon=True)
            _registry.refresher.start()
    _set_model_info()


def model_retired(version: str, deployment: str) -> None:
    """``deployment`` no longer scores with ``version`` in this process (a hot swap, an evicted model):
    its ``anomap_model_info`` drops to 0 and is no longer refreshed."""
    if (m := _instruments()) is None:
        return
    with _registry.lock:
        _registry.models.discard((version, deployment))
    m.model.set(0.0, {"model_version": version, "deployment": deployment})


def _set_model_info() -> None:
    if (m := _instruments()) is None:
        return
    with _registry.lock:
        models = list(_registry.models)
    for version, deployment in models:
        m.model.set(1.0, {"model_version": version, "deployment": deployment})


def _refresh_info() -> None:
    while True:
        time.sleep(INFO_REFRESH_S)
        _set_model_info()
