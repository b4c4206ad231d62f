"""The embedded stack's state file, ``<state_dir>/stack.json`` (mode 600: it holds credentials).

It records the endpoints the stack serves, the S3 keys generated for the embedded store, and, per
component, whether this code started it (with its `ManagedServer`: PID, start time, log) or it was
configured from outside.

    >>> state = read_state(Path(".anomap"))          # None when no stack was brought up
    >>> state.ray_address, state.components["redis"].origin
    ('127.0.0.1:21877', <Origin.EMBEDDED: 'embedded'>)
    >>> state.is_up()                                # every server it started is still running
    True
    >>> state.ray_metrics_url                        # Prometheus scrapes Ray's (and anomap's) metrics here
    'http://127.0.0.1:24533/metrics'
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer

from cluster.processes import ManagedServer
from cluster.redaction import redact_url
from schemas.settings import Settings

STATE_FILE = "stack.json"
STATE_VERSION = 1


class StateFileError(ValueError):
    """The state file exists but cannot be read as a stack state (the message names it and what is wrong)."""


class Component(StrEnum):
    """The servers a stack is made of."""

    REDIS = "redis"
    S3 = "s3"
    RAY = "ray"


class Origin(StrEnum):
    """Who runs a component: this code (embedded) or someone else (configured endpoint)."""

    EMBEDDED = "embedded"
    EXTERNAL = "external"


class ComponentState(BaseModel):
    """One component: where it is (never a secret) and, if embedded, its server process."""

    model_config = ConfigDict(extra="forbid")

    origin: Origin
    endpoint: str
    server: ManagedServer | None = None


class StackState(BaseModel):
    """Everything needed to use, inspect and stop a running stack."""

    model_config = ConfigDict(extra="forbid")

    version: int = STATE_VERSION
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    redis_url: SecretStr
    s3_endpoint: str
    s3_access_key: SecretStr
    s3_secret_key: SecretStr
    s3_secure: bool = False
    bucket: str
    ray_address: str | None = None
    components: dict[Component, ComponentState]

    @field_serializer("redis_url", "s3_access_key", "s3_secret_key", when_used="json")
    def _reveal(self, value: SecretStr) -> str:
        return value.get_secret_value()

    def public_json(self) -> str:
        """The state as JSON for people: the Redis URL redacted, S3 keys left out."""
        data = self.model_dump(mode="json", exclude={"s3_access_key", "s3_secret_key"})
        data["redis_url"] = redact_url(self.redis_url)
        return json.dumps(data, indent=2)

    def apply_to(self, settings: Settings, skip: Collection[Component] = ()) -> Settings:
        """``settings`` with this stack's endpoints filled in where ``settings`` leaves them unset.

        S3 endpoint and keys go together: an ``S3_ENDPOINT`` from the environment keeps its own keys.
        The components in ``skip`` (e.g. the ones whose server died) are left out.
        """
        update: dict[str, object] = {}
        if settings.redis_url is None and Component.REDIS not in skip:
            update["redis_url"] = self.redis_url
        if settings.s3_endpoint is None and Component.S3 not in skip:
            update |= {
                "s3_endpoint": self.s3_endpoint,
                "s3_access_key": self.s3_access_key,
                "s3_secret_key": self.s3_secret_key,
                "s3_secure": self.s3_secure,
            }
        if settings.ray_address is None and self.ray_address is not None and Component.RAY not in skip:
            update["ray_address"] = self.ray_address
        return settings.model_copy(update=update) if update else settings

    @property
    def ray_metrics_url(self) -> str | None:
        """The embedded Ray head's metrics endpoint (``ray start --metrics-export-port``); None when Ray
        is external or was not started."""
        ray = self.components.get(Component.RAY)
        if ray is None or ray.server is None or "metrics" not in ray.server.ports:
            return None
        host = ray.server.endpoint.rpartition(":")[0] or "127.0.0.1"
        return f"http://{host}:{ray.server.ports['metrics']}/metrics"

    @property
    def ray_dashboard_url(self) -> str | None:
        """The embedded Ray head's dashboard (web UI and State API); None when Ray is external, was not
        started, or was started without it (`cluster.servers.start_ray_head`)."""
        ray = self.components.get(Component.RAY)
        if ray is None or ray.server is None or "dashboard" not in ray.server.ports:
            return None
        host = ray.server.endpoint.rpartition(":")[0] or "127.0.0.1"
        return f"http://{host}:{ray.server.ports['dashboard']}"

    def servers(self) -> list[ManagedServer]:
        """The servers this stack started, in start order."""
        return [c.server for c in self.components.values() if c.server is not None]

    def is_up(self) -> bool:
        """Whether every server this stack started is still running."""
        return all(server.is_running() for server in self.servers())

    def dead_servers(self) -> list[ManagedServer]:
        """Servers this stack started that are no longer running."""
        return [server for server in self.servers() if not server.is_running()]

    def dead_components(self) -> list[Component]:
        """Components whose server this stack started and that are no longer running."""
        return [name for name, c in self.components.items() if c.server is not None and not c.server.is_running()]


def state_path(state_dir: Path) -> Path:
    """Where the state file of a stack kept in ``state_dir`` lives."""
    return state_dir / STATE_FILE


def read_state(state_dir: Path) -> StackState | None:
    """The recorded stack, or None when there is no state file.

    Raises `StateFileError` (a ValueError) naming the file when it exists but cannot be read as a stack state.
    """
    path = state_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:  # e.g. no permission, a folder of that name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StateFileError(f"{path} cannot be read as a stack state file ({reason})") from exc
    try:
        return StackState.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        msg = (
            f"{path} is not a valid stack state file ({exc.error_count()} errors; first: {where}: {first['msg']}); "
            "if no stack of it runs, remove it by hand"
        )
        raise StateFileError(msg) from exc


def write_state(state_dir: Path, state: StackState) -> Path:
    """Write the state file atomically with mode 600 (directory made 700 if it is created)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_path(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(state.model_dump(mode="json"), indent=2))
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_state(state_dir: Path) -> bool:
    """Delete the state file; returns whether there was one."""
    path = state_path(state_dir)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
