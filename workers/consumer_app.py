"""`StreamConsumers`: the stream consumers as a Serve application, for clusters where no
``anomap serve`` process runs them (a KubeRay `RayService`, ``serve run deploy/serve.yaml``).

    applications:
      - name: anomap-consumers
        import_path: workers.consumer_app:app_builder
        args: {lines: "default,line2", replicas: "2", consumers_per_replica: "2"}

Each replica runs ``consumers_per_replica`` `StreamConsumer` threads on the ``lines``' job streams
(one consumer group, ``scorers``, as with ``anomap serve``) and scores through the
``InspectionService`` of the scoring app (``anomap``) by handle. Nothing calls the deployment:
its replicas only host the threads. Serve restarts a replica whose consumer thread died
(``check_health``); a replica being stopped drains its jobs in flight first (``__del__``), and
whatever it still held is reclaimed by the others after ``claim_idle_ms``.

Connection settings come from the environment where the app is built (`Settings.from_env`), as
for the scoring app, and travel to the replicas with the deployment.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Mapping
from typing import Any

import redis
from ray import serve

from schemas import Settings, StreamNames
from schemas.ids import LINE_PATTERN
from trainer.store import ObjectStore
from workers.consumer import ConsumerConfig, ConsumerStats, StreamConsumer
from workers.logs import configure_logging
from workers.serve_app import APP_NAME, ServeInspector

log = logging.getLogger("anomap.consumer_app")

CONSUMER_APP_NAME = "anomap-consumers"
DRAIN_TIMEOUT_S = 60.0
"""How long a stopping replica lets its jobs in flight finish (Serve waits a little longer)."""


@serve.deployment(
    name="StreamConsumers",
    ray_actor_options={"num_cpus": 0.5},
    graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S + 30,
    health_check_period_s=10,
)
class StreamConsumers:
    """Hosts ``consumers`` `StreamConsumer` threads that feed the scoring app's ingress."""

    def __init__(
        self,
        settings: Settings,
        lines: tuple[str, ...] = ("default",),
        consumers: int = 2,
        max_in_flight: int = 2,
        claim_idle_ms: int = 60_000,
        scoring_app: str = APP_NAME,
    ) -> None:
        if settings.redis_url is None:
            msg = "REDIS_URL is not set; the stream consumers need it"
            raise ValueError(msg)
        configure_logging(logging.INFO, logger_name="anomap")  # JSON lines when ANOMAP_LOG_FORMAT=json
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        names = StreamNames(settings.stream_prefix)
        inspector = ServeInspector(serve.get_deployment_handle("InspectionService", app_name=scoring_app))
        replica = serve.get_replica_context().replica_id.unique_id
        self.stop = threading.Event()
        self.stats: dict[str, ConsumerStats] = {}
        self._threads: list[threading.Thread] = []
        for i in range(consumers):
            config = ConsumerConfig.for_service(
                settings,
                f"{socket.gethostname()}-{replica}-{i}",
                tuple(lines),
                max_in_flight=max_in_flight,
                claim_idle_ms=claim_idle_ms,
                drain_timeout_s=DRAIN_TIMEOUT_S,
            )
            client = redis.Redis.from_url(
                settings.redis_url.get_secret_value(),
                socket_timeout=30.0,  # above the consumer's XREADGROUP BLOCK
                socket_connect_timeout=5.0,
                socket_keepalive=True,
                health_check_interval=30,
            )
            consumer = StreamConsumer(client, store, inspector, names, config)
            consumer.ensure_groups()
            self.stats[config.consumer] = consumer.stats
            thread = threading.Thread(target=consumer.run, args=(self.stop,), name=config.consumer, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("started %d stream consumers on lines %s", consumers, ",".join(lines))

    def check_health(self) -> None:
        """Raise (so Serve replaces this replica) when a consumer thread has ended on its own."""
        dead = [thread.name for thread in self._threads if not thread.is_alive()]
        if dead and not self.stop.is_set():
            msg = f"stream consumer threads ended: {dead}"
            raise RuntimeError(msg)

    def outcomes(self) -> dict[str, dict[str, int]]:
        """Outcome counts per consumer since this replica started (and Serve's refusals, as ``backpressure``)."""
        return {
            name: {**{str(k): v for k, v in stats.outcomes.items()}, "backpressure": stats.backpressure}
            for name, stats in self.stats.items()
        }

    def __del__(self) -> None:
        """Stop reading and let the jobs in flight finish (Serve calls this when the replica stops)."""
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=DRAIN_TIMEOUT_S + 10)


def _int_arg(args: Mapping[str, Any], name: str, default: int) -> int:
    value = args.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        msg = f"app_builder arg {name} must be an integer >= 1, got {value!r}"
        raise ValueError(msg)
    return number


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """Application builder (``import_path: workers.consumer_app:app_builder``).

    ``args`` (strings or numbers): ``lines`` (comma-separated, default ``default``), ``replicas``
    (default 1), ``consumers_per_replica`` (2), ``max_in_flight`` (jobs per consumer, 2),
    ``claim_idle_ms`` (60000) and ``scoring_app`` (``anomap``). Unknown args are an error.
    Connection settings come from the environment (`Settings.from_env`).
    """
    known = {"lines", "replicas", "consumers_per_replica", "max_in_flight", "claim_idle_ms", "scoring_app"}
    unknown = sorted(set(args) - known)
    if unknown:
        msg = f"unknown app_builder args {unknown}; expected some of {sorted(known)}"
        raise ValueError(msg)
    lines = tuple(line.strip() for line in str(args.get("lines", "default")).split(",") if line.strip())
    bad = [line for line in lines if not re.fullmatch(LINE_PATTERN, line)]
    if not lines or bad:
        msg = f"app_builder arg lines must be comma-separated line ids ({LINE_PATTERN}), got {args.get('lines')!r}"
        raise ValueError(msg)
    settings = Settings.from_env()
    if settings.redis_url is None or settings.s3_endpoint is None:
        msg = "REDIS_URL and S3_ENDPOINT (+ S3_ACCESS_KEY, S3_SECRET_KEY) must be set where the app is built"
        raise ValueError(msg)
    return StreamConsumers.options(num_replicas=_int_arg(args, "replicas", 1)).bind(
        settings,
        lines,
        _int_arg(args, "consumers_per_replica", 2),
        _int_arg(args, "max_in_flight", 2),
        _int_arg(args, "claim_idle_ms", 60_000),
        str(args.get("scoring_app", APP_NAME)),
    )
