"""Connections to the stack (Redis, S3, Ray), from `Settings` filled in by a running embedded stack.

Endpoints set in the environment win; whatever is unset is taken from ``<state_dir>/stack.json``
when the stack recorded there is up (``anomap stack up``). Secrets stay `SecretStr`; log URLs
through `redact_url`.

    >>> settings = resolve_settings()                # env + running embedded stack
    >>> r = redis_client(settings); r.ping()
    True
    >>> store = object_store(settings)               # bucket created if missing
    >>> connect_ray(settings)                        # ray.init(address=...), idempotent
    '127.0.0.1:21877'
    >>> redact_url("redis://user:hunter2@db:6379/0")
    'redis://user:***@db:6379/0'

`LocalRay` runs an in-process, loopback-only Ray cluster (tests; one per session), whose metrics
endpoint (`workers.telemetry`) is at ``LocalRay.metrics_url``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlparse

import certifi
import redis
import urllib3
from minio import Minio

from cluster.ports import free_port
from cluster.redaction import redact_url
from cluster.state import read_state
from schemas.settings import Settings, s3_uses_tls
from trainer.store import ObjectStore

__all__ = [
    "RAY_ENV",
    "LocalRay",
    "MissingEndpoint",
    "RayUnreachable",
    "apply_ray_env",
    "connect_ray",
    "minio_client",
    "minio_from_endpoint",
    "object_store",
    "redact_url",
    "redis_client",
    "redis_from_url",
    "redis_tls_options",
    "resolve_settings",
    "shutdown_ray",
]

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
"""Ray environment for loopback-only clusters without a token file (see design/environment.md)."""


class MissingEndpoint(LookupError):
    """No endpoint is configured for a component and no running embedded stack provides one."""


class RayUnreachable(ConnectionError):
    """Nothing accepts connections at the Ray address (``ray.init`` would retry it without end)."""


RAY_PROBE_TIMEOUT_S = 3.0
"""How long `connect_ray` waits for the Ray address to accept a TCP connection."""


def probe_ray_address(address: str, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> None:
    """Raise `RayUnreachable` unless ``address`` (``host:port`` or ``ray://host:port``) accepts a TCP
    connection within ``timeout_s``; ``auto``, ``local`` and addresses without a port are not probed."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        msg = f"cannot reach Ray at {address} ({reason}); is the stack up (`anomap stack status`), RAY_ADDRESS right?"
        raise RayUnreachable(msg) from exc


def resolve_settings(settings: Settings | None = None) -> Settings:
    """``settings`` (default: from the environment) with unset endpoints filled from a running stack.

    Redis, S3 (endpoint and keys together) and Ray are each taken from the state file only when
    unset and only while the stack's server for it runs: with Ray dead, say, `anomap status` still
    reaches Valkey and the store.
    """
    settings = Settings.from_env() if settings is None else settings
    state = read_state(settings.state_dir)
    if state is None:
        return settings
    return state.apply_to(settings, skip=state.dead_components())


def _missing(what: str, variable: str, settings: Settings) -> MissingEndpoint:
    msg = f"no {what} configured: set {variable} or run `anomap stack up` (state dir {settings.state_dir})"
    return MissingEndpoint(msg)


def redis_tls_options(url: str) -> dict[str, Any]:
    """The TLS options `redis_from_url` adds for ``url``: a ``rediss://`` URL checks the server's hostname.

    redis-py 5 does not check it by default (6+ does), so it is asked for explicitly, unless the URL's
    query turns certificate checks off (``ssl_cert_reqs=none``: nothing to check the name against).
    The URL is read as redis-py reads it (``urlparse``); its own ``ssl_check_hostname`` still wins::

        redis_tls_options("rediss://:pw@cache:6380/0")                     # {'ssl_check_hostname': True}
        redis_tls_options("rediss://cache:6380/0?ssl_cert_reqs=none")      # {}
        redis_tls_options("redis://db:6379/0")                             # {}
    """
    if not url.startswith("rediss://"):
        return {}
    query = parse_qs(urlparse(url).query)
    if any(value.lower() == "none" for value in query.get("ssl_cert_reqs", [])[:1]):
        return {}
    return {"ssl_check_hostname": True}


def redis_from_url(url: str, *, socket_timeout: float = 30.0, **kwargs: Any) -> redis.Redis:
    """A bytes-in/bytes-out client for ``redis://`` / ``rediss://`` / ``unix://`` URLs.

    Passwords and ACL users come from the URL; ``rediss://`` checks the certificate and its hostname
    (`redis_tls_options`). ``socket_timeout`` must exceed any ``BLOCK`` a caller passes to
    ``XREADGROUP`` (default 30 s). Options in the URL's query win over kwargs.
    """
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        **redis_tls_options(url),
    }
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` (see `redis_from_url` for options)."""
    if settings.redis_url is None:
        raise _missing("Redis", "REDIS_URL", settings)
    return redis_from_url(settings.redis_url.get_secret_value(), **kwargs)


def minio_from_endpoint(
    endpoint: str,
    access_key: str | None,
    secret_key: str | None,
    secure: bool = False,
    *,
    region: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    retries: int = 3,
) -> Minio:
    """A MinIO client for ``host:port`` or ``http(s)://host:port``, with bounded timeouts and retries.

    TLS is used when ``secure`` is set or the endpoint starts with ``https://`` (`s3_uses_tls`, the rule
    of every S3 client). ``region``: the one
    requests are signed for (None: asked of the store, per bucket).
    """
    secure = s3_uses_tls(endpoint, secure)
    host = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        maxsize=16,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return Minio(host, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http)


def minio_client(settings: Settings) -> Minio:
    """A MinIO client for ``settings.s3_endpoint`` and its keys."""
    if settings.s3_endpoint is None:
        raise _missing("S3 store", "S3_ENDPOINT (+ S3_ACCESS_KEY, S3_SECRET_KEY)", settings)
    access = settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
    secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
    return minio_from_endpoint(settings.s3_endpoint, access, secret, settings.s3_tls, region=settings.s3_region)


def object_store(settings: Settings, bucket: str | None = None) -> ObjectStore:
    """An `ObjectStore` on ``bucket`` (default ``settings.bucket``); the bucket is created if missing."""
    store = ObjectStore(minio_client(settings), bucket or settings.bucket, settings.reference_buckets)
    store.ensure_bucket()
    return store


def apply_ray_env() -> None:
    """Set `RAY_ENV` in ``os.environ`` where not already set (call before ``ray.init``).

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported; if it was imported
    first, its constant is brought in line here. Without that, Ray turns a ``127.0.0.1`` address
    into the machine's outward IP, where nothing listens.
    """
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        flag = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in {"1", "true"}
        constants.ENABLE_RAY_CLUSTER = flag  # type: ignore[attr-defined]


def connect_ray(
    settings: Settings | None = None,
    *,
    log_to_driver: bool = False,
    namespace: str | None = None,
    **init_kwargs: Any,
) -> str:
    """Connect this process to the stack's Ray cluster; returns its GCS address.

    Idempotent: when Ray is already initialised here, returns the current address and does nothing.
    Raises `RayUnreachable` when nothing answers at the address (checked first: ``ray.init`` would wait
    for it without end).
    """
    import ray  # slow to import: only commands that use Ray pay for it

    apply_ray_env()
    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    settings = resolve_settings(settings)
    if settings.ray_address is None:
        raise _missing("Ray cluster", "RAY_ADDRESS", settings)
    probe_ray_address(settings.ray_address)
    ray.init(address=settings.ray_address, log_to_driver=log_to_driver, namespace=namespace, **init_kwargs)
    return settings.ray_address


def shutdown_ray() -> None:
    """Shut down Serve (if this process ever imported it) and disconnect from / stop Ray."""
    import ray

    if not ray.is_initialized():
        return
    if "ray.serve" in sys.modules:
        from ray import serve

        with contextlib.suppress(Exception):  # best effort: the cluster is going away anyway
            serve.shutdown()
    ray.shutdown()


LOCAL_RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
"""Ray Train settings for a one-node cluster on this machine (set where not already set): the controller
polls its workers every 0.5 s (Ray's default, 2 s, adds up to 2 s to every report and to the end of every
run), and no preemption watcher is started (an actor process per run, watching for cloud nodes being
reclaimed; this node is the machine itself). Together they save ~5 s of every training run on 2 cores."""


class LocalRay:
    """An in-process local Ray cluster on 127.0.0.1 with its own short temp dir.

        >>> cluster = LocalRay(num_cpus=4, metrics_report_interval_ms=2000)
        >>> with cluster as address:
        ...     ray.get(f.remote())
        ...     urllib.request.urlopen(cluster.metrics_url)     # Prometheus text, ray_anomap_* included

    Uses ``address="local"``: never joins another cluster found via ``RAY_ADDRESS`` or
    ``/tmp/ray``. Ray's metrics are served on ``metrics_port`` (free, chosen here unless given);
    ``metrics_report_interval_ms`` sets how often every process reports them (Ray's default: 10 s).
    Ray Train runs from this process poll their workers every 0.5 s, with no preemption watcher
    (`LOCAL_RAY_TRAIN_ENV`). On exit Serve is shut down, Ray stopped and the temp dir removed.
    """

    def __init__(
        self,
        num_cpus: int = 4,
        *,
        log_to_driver: bool = True,
        metrics_port: int | None = None,
        metrics_report_interval_ms: int | None = None,
        **init_kwargs: Any,
    ) -> None:
        self.num_cpus = num_cpus
        self.log_to_driver = log_to_driver
        self.metrics_port = metrics_port
        self.metrics_report_interval_ms = metrics_report_interval_ms
        self.init_kwargs = init_kwargs
        self.temp_dir: Path | None = None
        self.address: str | None = None

    @property
    def metrics_url(self) -> str:
        """Where Prometheus scrapes this cluster's metrics (known once the cluster is up)."""
        if self.metrics_port is None:
            msg = "LocalRay has no metrics port until it is entered"
            raise RuntimeError(msg)
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def __enter__(self) -> str:
        import ray

        apply_ray_env()
        for name, value in LOCAL_RAY_TRAIN_ENV.items():
            os.environ.setdefault(name, value)
        if ray.is_initialized():
            msg = "Ray is already initialised in this process; LocalRay starts its own cluster"
            raise RuntimeError(msg)
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"anomap-ray-{os.getuid()}-", dir="/tmp"))
        if self.metrics_port is None:
            self.metrics_port = free_port("127.0.0.1")
        options: dict[str, Any] = {
            "address": "local",
            "num_cpus": self.num_cpus,
            "include_dashboard": False,
            "log_to_driver": self.log_to_driver,
            "_node_ip_address": "127.0.0.1",
            "_temp_dir": str(self.temp_dir),
            "_metrics_export_port": self.metrics_port,
        }
        options.update(self.init_kwargs)
        if self.metrics_report_interval_ms is not None:
            system_config = self.init_kwargs.get("_system_config") or {}
            options["_system_config"] = {**system_config, "metrics_report_interval_ms": self.metrics_report_interval_ms}
        try:
            ray.init(**options)
        except BaseException:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        self.address = str(ray.get_runtime_context().gcs_address)
        return self.address

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            shutdown_ray()
        finally:
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
