"""The embedded stack: Valkey + ``weed mini`` + a Ray head on free 127.0.0.1 ports, or configured ones.

For each of Redis, S3 and Ray: if `Settings` names one (``REDIS_URL``; ``S3_ENDPOINT`` + keys;
``RAY_ADDRESS``) it is used and nothing of that kind is started; otherwise the embedded server is
started (random password for Valkey, random keys for the S3 store). The bucket is created and the
state (endpoints, keys, PIDs) written to ``<state_dir>/stack.json`` (mode 600).

    >>> state = stack_up(Settings.from_env(), progress=print)    # anomap stack up
    starting valkey ... ready at 127.0.0.1:24117 (0.2 s)
    ...
    >>> stack_status(settings)["components"]["redis"]["running"]
    True
    >>> stack_down(settings)                                     # anomap stack down
    ['ray (pid 4302) stopped', 'seaweed (pid 4261) stopped', 'valkey (pid 4250) stopped']

    >>> with EmbeddedStack(settings) as state:                   # anomap demo, tests
    ...     ...                                                  # stops only what it started
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from pydantic import SecretStr

from cluster.connections import minio_from_endpoint, redact_url, resolve_settings
from cluster.processes import ManagedServer, ServerStartError, tcp_accepts
from cluster.servers import S3Keys, start_ray_head, start_seaweed, start_valkey, valkey_url
from cluster.start_lock import start_lock
from cluster.state import (
    Component,
    ComponentState,
    Origin,
    StackState,
    read_state,
    remove_state,
    state_path,
    write_state,
)
from schemas.settings import Settings
from trainer.store import ObjectStore

__all__ = [
    "EmbeddedStack",
    "ProgressFn",
    "S3Keys",
    "StackError",
    "StackStartError",
    "stack_down",
    "stack_status",
    "stack_up",
    "start_ray_head",
    "start_seaweed",
    "start_valkey",
    "valkey_url",
]

ProgressFn = Callable[[str], None]


class StackError(RuntimeError):
    """The recorded stack is in a state that needs a person (partly up, failed to stop)."""


class StackStartError(StackError):
    """A server of the stack could not be started (one line: what failed, and the server's log when it has one).

    The full exception (with the end of the log) is its ``__cause__``.
    """


def _quiet(_message: str) -> None:
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(":").rstrip()


def _private_dir(path: Path) -> None:
    """Create ``path`` (mode 700) or make it 700: server data and logs (with keys in them) are ours alone."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _roll_back(started: list[ManagedServer], say: ProgressFn) -> None:
    for server in reversed(started):
        say(f"rolling back: {server.stop(timeout=10)}")


def _clean_up_dead(recorded: StackState, say: ProgressFn) -> None:
    """`ManagedServer.stop` each dead server of ``recorded``: it kills leftovers of its process group and
    removes its cleanup paths (Ray's /tmp/anomap-ray-*, weed's sockets)."""
    for server in recorded.dead_servers():
        try:
            say(f"cleaning up: {server.stop(timeout=10)}")
        except RuntimeError as exc:  # leftovers that survived SIGKILL
            msg = f"could not clean up after {server.name} (pid {server.pid}): {exc}; run `anomap stack down`"
            raise StackError(msg) from exc


def _bring_up(
    settings: Settings, say: ProgressFn, *, with_ray: bool, die_with_parent: bool, dashboard: bool = True
) -> StackState:
    """Start the embedded servers for whatever ``settings`` leaves unset; roll back on failure."""
    data_dir = settings.state_dir.resolve() / "data"
    started: list[ManagedServer] = []
    components: dict[Component, ComponentState] = {}

    def begin(name: str) -> float:
        say(f"starting {name} ...")
        return time.monotonic()

    try:
        _private_dir(data_dir)
        if settings.redis_url is not None:
            redis_url = settings.redis_url
            components[Component.REDIS] = ComponentState(origin=Origin.EXTERNAL, endpoint=redact_url(redis_url))
        else:
            t0 = begin("valkey")
            password = secrets.token_hex(16)
            server = start_valkey(  # AOF: queued jobs and pending entries survive a restart of the stack
                data_dir / "valkey", password=password, appendonly=True, die_with_parent=die_with_parent
            )
            started.append(server)
            redis_url = SecretStr(valkey_url(server, password))
            components[Component.REDIS] = ComponentState(
                origin=Origin.EMBEDDED, endpoint=redact_url(redis_url), server=server
            )
            say(f"valkey ready at {server.endpoint} ({time.monotonic() - t0:.1f} s)")

        if settings.s3_endpoint is not None:
            s3_endpoint, s3_secure = settings.s3_endpoint, settings.s3_secure
            access = settings.s3_access_key or SecretStr("")
            secret = settings.s3_secret_key or SecretStr("")
            components[Component.S3] = ComponentState(origin=Origin.EXTERNAL, endpoint=s3_endpoint)
        else:
            t0 = begin("seaweed (weed mini)")
            keys = S3Keys.random()
            access, secret, s3_secure = SecretStr(keys.access_key), SecretStr(keys.secret_key), False
            server = start_seaweed(
                data_dir / "seaweed", keys.access_key, keys.secret_key, die_with_parent=die_with_parent
            )
            started.append(server)
            s3_endpoint = server.endpoint
            components[Component.S3] = ComponentState(origin=Origin.EMBEDDED, endpoint=s3_endpoint, server=server)
            say(f"seaweed ready at {s3_endpoint} ({time.monotonic() - t0:.1f} s)")

        client = minio_from_endpoint(
            s3_endpoint, access.get_secret_value() or None, secret.get_secret_value() or None, s3_secure
        )
        ObjectStore(client, settings.bucket).ensure_bucket()
        say(f"bucket {settings.bucket} ready")

        ray_address = settings.ray_address
        if ray_address is not None:
            components[Component.RAY] = ComponentState(origin=Origin.EXTERNAL, endpoint=ray_address)
        elif with_ray:
            t0 = begin("ray head")
            server = start_ray_head(data_dir / "ray", dashboard=dashboard, die_with_parent=die_with_parent)
            started.append(server)
            ray_address = server.endpoint
            components[Component.RAY] = ComponentState(origin=Origin.EMBEDDED, endpoint=ray_address, server=server)
            metrics = server.ports.get("metrics")
            where = f", dashboard on port {server.ports['dashboard']}" if "dashboard" in server.ports else ""
            say(f"ray head ready at {ray_address}, metrics on port {metrics}{where} ({time.monotonic() - t0:.1f} s)")
    except (ServerStartError, OSError, RuntimeError) as exc:  # a server that did not start, no binary, no ports
        _roll_back(started, say)
        raise StackStartError(f"stack not started: {_first_line(exc)}") from exc
    except BaseException:
        _roll_back(started, say)
        raise
    return StackState(
        redis_url=redis_url,
        s3_endpoint=s3_endpoint,
        s3_access_key=access,
        s3_secret_key=secret,
        s3_secure=s3_secure,
        bucket=settings.bucket,
        ray_address=ray_address,
        components=components,
    )


def stack_up(
    settings: Settings, progress: ProgressFn | None = None, *, with_ray: bool = True, dashboard: bool = True
) -> StackState:
    """Bring the stack up (servers outlive this process) and write the state file.

    If the state file records a stack whose servers all still run, it is returned as is (even if
    it was brought up without Ray). If only some of them run, `StackError` asks for
    ``anomap stack down`` first. A state file whose servers are all gone is replaced.
    ``with_ray=False`` starts no Ray head (and records no Ray address unless ``RAY_ADDRESS`` is set);
    ``dashboard=False`` starts it without Ray's dashboard (see `start_ray_head`).
    """
    say = progress or _quiet
    path = state_path(settings.state_dir)
    with start_lock(settings.state_dir):
        existing = read_state(settings.state_dir)
        if existing is not None:
            if not existing.dead_servers():
                say(f"stack already up (state {path}); reusing it")
                return existing
            _refuse_partly_up(existing, path)
            _clean_up_dead(existing, say)
            say(f"replacing stale state file {path} (its servers are gone)")
            remove_state(settings.state_dir)
        state = _bring_up(settings, say, with_ray=with_ray, die_with_parent=False, dashboard=dashboard)
        try:
            write_state(settings.state_dir, state)
        except BaseException:
            for server in reversed(state.servers()):
                server.stop(timeout=10)
            raise
    say(f"state written to {path}")
    return state


def _refuse_partly_up(recorded: StackState, path: Path) -> None:
    """Raise `StackError` when some of ``recorded``'s servers stopped while others still run: starting anew
    would run a second server on the survivors' data."""
    dead = recorded.dead_servers()
    alive = [s for s in recorded.servers() if s.is_running()]
    if dead and alive:
        names = ", ".join(f"{s.name} (pid {s.pid})" for s in alive)
        gone = ", ".join(s.name for s in dead)
        msg = f"the stack in {path} is partly up: {gone} stopped, {names} still running; run `anomap stack down`"
        raise StackError(msg)


def stack_down(settings: Settings, progress: ProgressFn | None = None) -> list[str]:
    """Stop exactly the servers the state file records (if they still are ours); remove the file.

    External components are left alone. Returns one line per component. If a server cannot be
    stopped the state file is kept and `StackError` raised. Holds the start lock (`start_lock`), so a
    stop never runs during a start in the same state dir.
    """
    say = progress or _quiet
    if not settings.state_dir.is_dir():  # no lock file made for nothing
        return [_nothing_recorded(settings, say)]
    with start_lock(settings.state_dir):
        return _stop_recorded(settings, say)


def _nothing_recorded(settings: Settings, say: ProgressFn) -> str:
    line = f"no stack recorded in {state_path(settings.state_dir)}; nothing to stop"
    say(line)
    return line


def _stop_recorded(settings: Settings, say: ProgressFn) -> list[str]:
    """`stack_down` while holding the start lock."""
    state = read_state(settings.state_dir)
    if state is None:
        return [_nothing_recorded(settings, say)]
    lines: list[str] = []
    failures: list[str] = []
    for kind, component in reversed(state.components.items()):
        if component.server is None:
            line = f"{kind}: external ({component.endpoint}), left alone"
        else:
            try:
                line = component.server.stop()
            except RuntimeError as exc:
                failures.append(str(exc))
                line = str(exc)
        say(line)
        lines.append(line)
    if failures:
        msg = f"could not stop everything; state file {state_path(settings.state_dir)} kept: {'; '.join(failures)}"
        raise StackError(msg)
    remove_state(settings.state_dir)
    return lines


def _probe_redis(url: SecretStr) -> bool:
    client = redis.Redis.from_url(url.get_secret_value(), socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _probe_s3(endpoint: str, access: SecretStr | None, secret: SecretStr | None, secure: bool, bucket: str) -> bool:
    client = minio_from_endpoint(
        endpoint,
        access.get_secret_value() or None if access else None,
        secret.get_secret_value() or None if secret else None,
        secure,
        connect_timeout=2.0,
        read_timeout=5.0,
        retries=0,
    )
    try:
        client.bucket_exists(bucket)
    except Exception:  # any failure means "not reachable" for a status line
        return False
    return True


def _probe_ray(address: str | None) -> bool:
    if not address:
        return False
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return port.isdigit() and tcp_accepts(host or "127.0.0.1", int(port), timeout=2)


def stack_status(settings: Settings) -> dict[str, Any]:
    """Each component's origin, endpoint (passwords redacted), pid, running and reachable; no secrets.

    Without a state file it reports the endpoints configured in ``settings`` (the rest: not started).
    """
    path = state_path(settings.state_dir)
    state = read_state(settings.state_dir)
    if state is None:
        resolved = resolve_settings(settings)
        components: dict[str, dict[str, Any]] = {}
        configured = {
            Component.REDIS: redact_url(resolved.redis_url) if resolved.redis_url else None,
            Component.S3: resolved.s3_endpoint,
            Component.RAY: resolved.ray_address,
        }
        for kind, endpoint in configured.items():
            if endpoint is None:
                components[kind.value] = {"origin": Origin.EMBEDDED.value, "endpoint": None, "running": False}
            else:
                components[kind.value] = {"origin": Origin.EXTERNAL.value, "endpoint": endpoint}
        if resolved.redis_url is not None:
            components["redis"]["reachable"] = _probe_redis(resolved.redis_url)
        if resolved.s3_endpoint is not None:
            components["s3"]["reachable"] = _probe_s3(
                resolved.s3_endpoint,
                resolved.s3_access_key,
                resolved.s3_secret_key,
                resolved.s3_secure,
                resolved.bucket,
            )
        if resolved.ray_address is not None:
            components["ray"]["reachable"] = _probe_ray(resolved.ray_address)
        return {"state_file": str(path), "stack": "not started", "components": components}

    reachable = {
        Component.REDIS: _probe_redis(state.redis_url),
        Component.S3: _probe_s3(
            state.s3_endpoint, state.s3_access_key, state.s3_secret_key, state.s3_secure, state.bucket
        ),
        Component.RAY: _probe_ray(state.ray_address),
    }
    report: dict[str, dict[str, Any]] = {}
    for kind, component in state.components.items():
        entry: dict[str, Any] = {"origin": component.origin.value, "endpoint": component.endpoint}
        if component.server is not None:
            entry |= {
                "pid": component.server.pid,
                "running": component.server.is_running(),
                "log": str(component.server.log_path),
            }
        entry["reachable"] = reachable[kind]
        if kind == Component.RAY and state.ray_metrics_url is not None:
            entry["metrics"] = state.ray_metrics_url  # where Prometheus scrapes Ray's and anomap's metrics
        if kind == Component.RAY and state.ray_dashboard_url is not None:
            entry["dashboard"] = state.ray_dashboard_url
        report[kind.value] = entry
    dead = state.dead_servers()
    overall = "up" if not dead else ("down" if len(dead) == len(state.servers()) else "partly up")
    return {
        "state_file": str(path),
        "stack": overall,
        "bucket": state.bucket,
        "started_at": state.created_at.isoformat(),
        "components": report,
    }


class EmbeddedStack:
    """Context manager: bring up what is missing, tear down only what it started.

    Endpoints configured in ``settings`` or provided by a running ``anomap stack up`` are used as
    they are. Servers started here get SIGTERM if this process dies (``die_with_parent``). If no
    running stack is recorded in ``state_dir``, the state file is written on entry (so other
    ``anomap`` commands find the stack) and removed on exit. ``with`` gives the `StackState`;
    ``.settings`` holds the complete `Settings` while inside:

        >>> stack = EmbeddedStack(Settings.from_env(), progress=console.log)
        >>> with stack as state:
        ...     connect_ray(stack.settings)          # == state.apply_to(settings)
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        with_ray: bool = True,
        progress: ProgressFn | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self._base = settings
        self.with_ray = with_ray
        self._say = progress or _quiet
        self.die_with_parent = die_with_parent
        self.state: StackState | None = None
        self.settings: Settings | None = None
        self._wrote_state = False

    def __enter__(self) -> StackState:
        given = self._base or Settings.from_env()  # read the environment once
        with start_lock(given.state_dir):
            base = resolve_settings(given)
            recorded = read_state(base.state_dir)
            if recorded is not None:
                _refuse_partly_up(recorded, state_path(base.state_dir))
                _clean_up_dead(recorded, self._say)
            state = _bring_up(base, self._say, with_ray=self.with_ray, die_with_parent=self.die_with_parent)
            self.state = state
            self.settings = state.apply_to(base)
            if state.servers() and (recorded is None or not recorded.is_up()):
                try:
                    write_state(base.state_dir, state)
                except BaseException:
                    self._stop_started()
                    raise
                self._wrote_state = True
        return state

    def _stop_started(self) -> None:
        if self.state is None:
            return
        for server in reversed(self.state.servers()):
            self._say(server.stop())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._stop_started()
        finally:
            if self._wrote_state and self.settings is not None:
                recorded = read_state(self.settings.state_dir)
                ours = {s.pid for s in self.state.servers()} if self.state else set()
                if recorded is not None and {s.pid for s in recorded.servers()} == ours:
                    remove_state(self.settings.state_dir)
            self.state = None
