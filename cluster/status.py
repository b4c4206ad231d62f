"""`gather_status`: what ``anomap status`` shows, as one JSON-ready dict.

    status = gather_status(resolve_settings())
    status["streams"]["anomap:jobs"]        # {"kind": "jobs", "line": "default", "length": 12, "lag": 3,
                                            #  "pending": 2, "groups": [{"name": "scorers", "consumers": [...]}]}
    status["jobs"]                          # totals over every job stream: length, lag, pending
    status["dead_letters"]                  # {"total": 4, "by_reason": {"undecodable_image": 3, ...}}
    status["results"]                       # last minute: count, per_s, latency_ms p50/p95/p99
    status["serve"]                         # Serve applications and replicas, or why they are unknown
    status["model"]                         # {"name": "metal", "live": {"default": "v2026..."}}

Streams are every ``<prefix>:*`` key of type stream plus the well-known ones (job and result
streams of the default line, dead letters, confirmations, models), so a missing stream shows as
``exists: false``. ``lag`` is the server's count of entries not yet delivered to a group (Redis >= 7;
``null`` when the server cannot tell, or when no consumer group reads the stream, as for results);
``pending`` counts entries delivered and not acknowledged. Consumer ``idle_ms`` is the time since
the consumer last asked for entries, ``inactive_ms`` since it last got one (Redis >= 7.2).

Nothing here reads job entries themselves (they may carry megabytes of image): results and dead
letters are sampled from the newest end, at most ``results_sample`` / ``dead_sample`` entries.
"""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from cluster.connections import MissingEndpoint, minio_from_endpoint, redact_url, redis_client
from schemas import Settings, StreamNames
from trainer.registry import ModelNotFound, ModelRegistry
from trainer.store import ObjectStore
from workers.loadgen import percentile

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class StatusOptions:
    """How much ``gather_status`` looks at."""

    results_window_s: float = 60.0
    """Throughput and latency are over results written in this many seconds before now."""
    results_sample: int = 5000
    """At most this many of the newest results per line are read (the rate is extrapolated beyond)."""
    dead_sample: int = 10_000
    """Dead letters counted by reason: at most this many of the newest."""
    serve: bool = True
    """Ask Ray for the Serve applications (connects to ``RAY_ADDRESS``)."""
    scan: bool = False
    """Find streams by scanning the keyspace rather than from the line set (see `stream_names`)."""


def _text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def classify_stream(name: str, names: StreamNames) -> tuple[str, str | None]:
    """``(kind, line)`` of a stream name: jobs / results (with their line), dead, confirmations, models, other."""
    fixed = {names.dead: "dead", names.confirmations: "confirmations", names.models: "models"}
    if name in fixed:
        return fixed[name], None
    for kind, base in (("jobs", names.jobs()), ("results", names.results())):
        if name == base:
            return kind, "default"
        if name.startswith(base + ":"):
            return kind, name[len(base) + 1 :]
    return "other", None


def stream_names(client: redis.Redis, names: StreamNames, scan: bool = False) -> list[str]:
    """The jobs and results streams of every line in the line set (``names.lines``), plus the well-known
    ones whether they exist or not.

    With ``scan``, or while no line set exists (a deployment older than it), every stream under the
    prefix is found by SCAN instead: that walks the whole keyspace, millions of done markers at fleet
    scale, so it is not the default.
    """
    lines = {_text(line) for line in client.smembers(names.lines)} if not scan else set()
    if lines:
        found = {stream for line in lines for stream in (names.jobs(line), names.results(line))}
    else:
        found = {_text(key) for key in client.scan_iter(match=f"{names.prefix}:*", count=1000, _type="STREAM")}
    found |= {names.jobs(), names.results(), names.dead, names.confirmations, names.models}
    order = {"jobs": 0, "results": 1, "dead": 2, "confirmations": 3, "models": 4, "other": 5}
    return sorted(found, key=lambda name: (order[classify_stream(name, names)[0]], name))


def _consumers(client: redis.Redis, stream: str, group: str) -> list[dict[str, Any]]:
    consumers = []
    for info in client.xinfo_consumers(stream, group):
        inactive = info.get("inactive")
        consumers.append(
            {
                "name": _text(info["name"]),
                "pending": int(info["pending"]),
                "idle_ms": int(info["idle"]),
                "inactive_ms": None if inactive is None or int(inactive) < 0 else int(inactive),
            }
        )
    return consumers


def stream_status(client: redis.Redis, stream: str, names: StreamNames) -> dict[str, Any]:
    """Length, consumer groups (lag, pending, consumers) of one stream (XLEN, XINFO GROUPS/CONSUMERS)."""
    kind, line = classify_stream(stream, names)
    status: dict[str, Any] = {"kind": kind, "line": line, "exists": bool(client.exists(stream))}
    status["length"] = int(client.xlen(stream)) if status["exists"] else 0
    groups = []
    if status["exists"]:
        for info in client.xinfo_groups(stream):
            group = _text(info["name"])
            lag = info.get("lag")
            groups.append(
                {
                    "name": group,
                    "lag": None if lag is None else int(lag),
                    "pending": int(info["pending"]),
                    "last_delivered_id": _text(info["last-delivered-id"]),
                    "consumers": _consumers(client, stream, group),
                }
            )
    status["groups"] = groups
    lags = [group["lag"] for group in groups]
    if not groups:  # nobody reads it: on a jobs stream every entry waits (a line no consumer serves)
        status["lag"] = status["length"] if kind == "jobs" else None
    else:
        status["lag"] = None if None in lags else sum(lags)
    status["pending"] = sum(group["pending"] for group in groups)
    return status


def _entry_ms(entry_id: bytes | str) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def estimated_window_count(sampled: int, oldest_sampled_ms: int, now_ms: int, window_ms: int) -> int:
    """Entries in the last ``window_ms`` when only the newest ``sampled`` were read, the oldest at
    ``oldest_sampled_ms``: exactly ``sampled`` since then, and the same rate before it.

    The rate is taken over oldest-sampled .. now, not oldest .. newest sampled: after a burst that
    ended a while ago the stream is quiet now, and the span of the sample alone would credit the
    whole window with the burst's rate.
    """
    since_ms = max(now_ms - oldest_sampled_ms, 1)
    return round(sampled * max(window_ms, since_ms) / since_ms)


def recent_results(
    client: redis.Redis, stream: str, now_ms: int, window_s: float, sample: int
) -> tuple[dict[str, Any], list[float]]:
    """Results written in the last ``window_s`` on one results stream: count, rate, latency
    percentiles, model versions; and the sampled latencies (ms), for pooling over lines."""
    window_ms = int(window_s * 1000)
    items = client.xrevrange(stream, max="+", min=str(now_ms - window_ms), count=sample)
    latencies: list[float] = []
    versions: Counter[str] = Counter()
    anomalous = 0
    for _, fields in items:
        try:
            result = json.loads(fields[b"result"])
            latencies.append(float(result["latency_ms"]))
            versions[str(result["model_version"])] += 1
            anomalous += bool(result.get("is_anomalous"))
        except (KeyError, ValueError, TypeError):
            continue  # not a result entry: counted, not measured
    count: float = len(items)
    estimated = len(items) >= sample > 1
    if estimated:  # more than the sample: extrapolate
        count = estimated_window_count(len(items), _entry_ms(items[-1][0]), now_ms, window_ms)
        anomalous = round(anomalous * count / len(items))
    return {
        "count": int(count),
        "estimated": estimated,
        "per_s": count / window_s,
        "anomalous": anomalous,
        "latency_ms": {f"p{q}": percentile(latencies, q) for q in PERCENTILES},
        "model_versions": dict(versions),
        "sampled": len(items),
    }, latencies


def dead_letter_counts(client: redis.Redis, stream: str, sample: int) -> dict[str, Any]:
    """Dead letters by reason over the newest ``sample`` entries, and the stream's total."""
    items = client.xrevrange(stream, count=sample)
    reasons: Counter[str] = Counter()
    for _, fields in items:
        try:
            reasons[str(json.loads(fields[b"dead"])["reason"])] += 1
        except (KeyError, ValueError, TypeError):
            reasons["unreadable"] += 1
    return {
        "total": int(client.xlen(stream)),
        "by_reason": dict(reasons.most_common()),
        "sampled": len(items),
    }


def model_status(settings: Settings, lines: Iterable[str]) -> dict[str, Any]:
    """The live model version of the default line and of each line with its own pointer."""
    status: dict[str, Any] = {"name": settings.model_name, "live": {}}
    if settings.s3_endpoint is None:
        status["error"] = "S3_ENDPOINT not set and no embedded stack is up"
        return status
    access = settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
    secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
    client = minio_from_endpoint(
        settings.s3_endpoint,
        access,
        secret,
        settings.s3_secure,
        region=settings.s3_region,
        connect_timeout=2.0,
        read_timeout=5.0,
        retries=0,
    )
    registry = ModelRegistry(ObjectStore(client, settings.bucket), settings.model_name)
    try:
        for line in ["default", *sorted(set(lines) - {"default"})]:
            try:
                status["live"][line] = registry.live_version(line)
            except ModelNotFound:
                status["live"][line] = None
        status["versions"] = len(registry.versions())
    except Exception as exc:  # the store is away or refuses: say so, keep the rest of the status
        status["error"] = f"object store {settings.s3_endpoint}: {type(exc).__name__}: {exc}"
    return status


def _answers(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def summarize_serve(status: Any) -> dict[str, Any]:
    """A `ray.serve.schema.ServeStatus` as JSON: per application its status and deployments' replicas."""
    applications = {}
    for name, app in status.applications.items():
        deployments = {
            deployment_name: {
                "status": str(getattr(deployment.status, "value", deployment.status)),
                "replicas": {
                    str(getattr(state, "value", state)): int(count)
                    for state, count in deployment.replica_states.items()
                },
                "message": deployment.message,
            }
            for deployment_name, deployment in app.deployments.items()
        }
        applications[name] = {
            "status": str(getattr(app.status, "value", app.status)),
            "message": app.message,
            "deployments": deployments,
        }
    return {"available": True, "applications": applications}


def serve_status(settings: Settings) -> dict[str, Any]:
    """Serve's applications and replicas, or ``{"available": false, "reason": ...}`` when Ray is not reachable.

    Unless Ray is already initialised in this process, it connects for this one query and disconnects
    after: a process that stays a Ray driver is terminated by Ray about a minute after the cluster's GCS
    goes away, and ``anomap status --watch`` must live on and say so in each sample.
    """
    address = settings.ray_address
    if address is None:
        return {"available": False, "reason": "RAY_ADDRESS not set and no embedded stack is up"}
    if address not in ("auto", "local") and not _answers(address):
        return {"available": False, "reason": f"Ray: unreachable (nothing answers at {address})"}
    try:
        import ray
    except Exception as exc:  # Ray is optional here: report it and show the streams anyway
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    connected_here = not ray.is_initialized()
    try:
        return _query_serve(settings)
    except Exception as exc:  # Ray is optional here: report it and show the streams anyway
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        if connected_here and ray.is_initialized():
            ray.shutdown()


def _query_serve(settings: Settings) -> dict[str, Any]:
    from ray import serve

    from cluster.connections import connect_ray

    connect_ray(settings, logging_level=logging.WARNING)  # no "Connecting to existing Ray cluster" per sample
    return summarize_serve(serve.status())


def _redis_endpoint(settings: Settings) -> str | None:
    return redact_url(settings.redis_url.get_secret_value()) if settings.redis_url is not None else None


def gather_status(settings: Settings, options: StatusOptions | None = None) -> dict[str, Any]:
    """Everything ``anomap status`` shows, as a JSON-ready dict (see the module docstring)."""
    options = options or StatusOptions()
    names = StreamNames(settings.stream_prefix)
    status: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "prefix": names.prefix,
        "redis": {"url": _redis_endpoint(settings), "ok": False},
    }
    try:
        client = redis_client(settings, socket_timeout=5.0)
        client.ping()
        status["redis"]["ok"] = True
    except (MissingEndpoint, redis.RedisError) as exc:
        status["redis"]["error"] = str(exc)
        client = None
    streams: dict[str, dict[str, Any]] = {}
    latencies: list[float] = []
    if client is not None:
        try:
            seconds, micros = client.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            for name in stream_names(client, names, options.scan):
                streams[name] = stream_status(client, name, names)
                if streams[name]["kind"] == "results":
                    streams[name]["recent"], sampled = recent_results(
                        client, name, now_ms, options.results_window_s, options.results_sample
                    )
                    latencies += sampled
            status["dead_letters"] = dead_letter_counts(client, names.dead, options.dead_sample)
        except redis.RedisError as exc:  # lost mid-report: show what was read, and say so
            status["redis"].update(ok=False, error=f"lost while reading the streams: {exc}")
        finally:
            client.close()
    status["streams"] = streams
    jobs = [s for s in streams.values() if s["kind"] == "jobs" and s["exists"]]
    lags = [s["lag"] for s in jobs]
    status["jobs"] = {
        "streams": len(jobs),
        "length": sum(s["length"] for s in jobs),
        "lag": None if None in lags else sum(lags),
        "pending": sum(s["pending"] for s in jobs),
        "consumers": sum(len(g["consumers"]) for s in jobs for g in s["groups"]),
    }
    status["results"] = _pooled_results([s["recent"] for s in streams.values() if "recent" in s], latencies, options)
    status.setdefault("dead_letters", {"total": None, "by_reason": {}, "sampled": 0})
    lines = {s["line"] for s in streams.values() if s["line"] is not None}
    status["serve"] = serve_status(settings) if options.serve else {"available": False, "reason": "not asked"}
    status["model"] = model_status(settings, lines)
    return status


def _pooled_results(recent: list[dict[str, Any]], latencies: list[float], options: StatusOptions) -> dict[str, Any]:
    versions: Counter[str] = Counter()
    for stream in recent:
        versions.update(stream["model_versions"])
    count = sum(stream["count"] for stream in recent)
    return {
        "window_s": options.results_window_s,
        "count": count,
        "estimated": any(stream["estimated"] for stream in recent),
        "per_s": count / options.results_window_s,
        "latency_ms": {f"p{q}": percentile(latencies, q) for q in PERCENTILES},
        "model_versions": dict(versions),
    }
