"""`Settings`: where the stack is and how the service behaves, read from the environment.

| variable | meaning | default |
|---|---|---|
| ``REDIS_URL`` | ``redis://`` / ``rediss://`` URL, with password or ACL user | embedded Valkey |
| ``S3_ENDPOINT`` | ``host:port`` or ``http(s)://host:port`` of an S3 store | embedded ``weed mini`` |
| ``S3_ACCESS_KEY`` / ``S3_SECRET_KEY`` | S3 credentials | generated for the embedded store |
| ``S3_SECURE`` | ``1`` to use TLS (an ``https://`` endpoint always does; ``0`` with one is an error) | ``0`` |
| ``S3_REGION`` | region to sign S3 requests for (AWS; MinIO and SeaweedFS accept any) | unset (below) |
| ``ANOMAP_BUCKET`` | bucket for models, maps, datasets, images | ``anomap`` |
| ``ANOMAP_REFERENCE_BUCKETS`` | other buckets that ``image_ref`` and ``mask_ref`` may name, comma-separated | none |
| ``RAY_ADDRESS`` | an existing Ray cluster | embedded Ray head |
| ``ANOMAP_STREAM_PREFIX`` | prefix of every stream name | ``anomap`` |
| ``ANOMAP_MODEL_NAME`` | model name in the registry | ``metal`` |
| ``ANOMAP_STATE_DIR`` | where the embedded stack keeps its state and data | ``./.anomap`` |
| ``ANOMAP_DONE_TTL_S`` | lifetime of a job's done/settled markers, 1 h – 90 d (below) | ``604800`` (7 d) |

A ``job_id`` published again within ``ANOMAP_DONE_TTL_S`` is answered once. The markers dominate
Redis memory at fleet scale (~215 B per job: 130 GB for 7 days at 1000 images/s, docs/capacity.md):
size Redis for them, or shorten it.

Every S3 client (MinIO's, pyarrow's) decides TLS the same way, by `s3_uses_tls` (``Settings.s3_tls``).

With ``S3_REGION`` unset the MinIO client asks the store for the bucket's region; only Ray Train's
checkpoint filesystem (`trainer.store`) then signs for ``us-east-1``.

How the Serve app is sized and how much it queues (`ServingConfig`, ``settings.serving``):

| variable | meaning | default |
|---|---|---|
| ``ANOMAP_SCORER_REPLICAS`` | fixed number of ``PatchScorer`` replicas (without autoscaling) | ``2`` |
| ``ANOMAP_SCORER_MAX_REPLICAS`` | set it to autoscale the scorers between min and max replicas | unset: fixed |
| ``ANOMAP_SCORER_MIN_REPLICAS`` | the autoscaler's lower bound (and starting count) | ``1`` |
| ``ANOMAP_SCORER_TARGET_ONGOING`` | the autoscaler's target of patch chunks in progress per replica | ``8`` |
| ``ANOMAP_SCORER_MAX_ONGOING`` | patch chunks one scorer replica works on at once | ``32`` |
| ``ANOMAP_SCORER_MAX_QUEUED`` | chunks waiting per caller for a scorer, ``-1``: no limit | ``-1`` |
| ``ANOMAP_INGRESS_REPLICAS`` | ``InspectionService`` replicas (each stitches on one core: ~7 images/s) | ``1`` |
| ``ANOMAP_INGRESS_MAX_ONGOING`` | images one ``InspectionService`` replica works on at once | ``16`` |
| ``ANOMAP_INGRESS_MAX_QUEUED`` | images waiting per caller for the ingress, ``-1``: no limit | ``64`` |

A call over a ``MAX_QUEUED`` limit is refused at once (Serve's ``BackPressureError``): stream
consumers then wait and retry the same job, HTTP callers get a 503. The ingress sends an image's
chunks together and re-sends those the scorer queue refuses, so a small scorer queue paces images
(and, the ingress being busy longer, pushes back on its callers) rather than failing them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from schemas.ids import BUCKET_PATTERN, MODEL_NAME_PATTERN

SERVING_VARIABLES = {
    "scorer_replicas": "ANOMAP_SCORER_REPLICAS",
    "scorer_min_replicas": "ANOMAP_SCORER_MIN_REPLICAS",
    "scorer_max_replicas": "ANOMAP_SCORER_MAX_REPLICAS",
    "scorer_target_ongoing": "ANOMAP_SCORER_TARGET_ONGOING",
    "scorer_max_ongoing": "ANOMAP_SCORER_MAX_ONGOING",
    "scorer_max_queued": "ANOMAP_SCORER_MAX_QUEUED",
    "ingress_replicas": "ANOMAP_INGRESS_REPLICAS",
    "ingress_max_ongoing": "ANOMAP_INGRESS_MAX_ONGOING",
    "ingress_max_queued": "ANOMAP_INGRESS_MAX_QUEUED",
}
"""`ServingConfig` field → the environment variable that sets it."""


class ServingConfig(BaseModel):
    """Replica counts, autoscaling and request limits of the Serve app (see the table above).

    Autoscaling is on when ``scorer_max_replicas`` is set; ``scorer_replicas`` is then unused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scorer_replicas: int = 2
    scorer_min_replicas: int = 1
    scorer_max_replicas: int | None = None
    scorer_target_ongoing: float = 8.0
    scorer_max_ongoing: int = 32
    scorer_max_queued: int = -1
    ingress_replicas: int = 1
    ingress_max_ongoing: int = 16
    ingress_max_queued: int = 64

    @model_validator(mode="after")
    def _limits_are_sane(self) -> ServingConfig:
        def name(field: str) -> str:
            return f"{field} ({SERVING_VARIABLES[field]})"

        problems = [
            f"{name(field)} must be >= 1, got {getattr(self, field)}"
            for field in (
                "scorer_replicas",
                "scorer_min_replicas",
                "scorer_max_ongoing",
                "ingress_replicas",
                "ingress_max_ongoing",
            )
            if getattr(self, field) < 1
        ]
        problems += [
            f"{name(field)} must be -1 (no limit) or >= 1, got {getattr(self, field)}"
            for field in ("scorer_max_queued", "ingress_max_queued")
            if getattr(self, field) == 0 or getattr(self, field) < -1
        ]
        if not self.scorer_target_ongoing > 0:
            problems.append(f"{name('scorer_target_ongoing')} must be > 0, got {self.scorer_target_ongoing}")
        if self.scorer_max_replicas is not None and self.scorer_max_replicas < self.scorer_min_replicas:
            problems.append(
                f"{name('scorer_max_replicas')} = {self.scorer_max_replicas} must be >= "
                f"{name('scorer_min_replicas')} = {self.scorer_min_replicas}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def autoscaling(self) -> bool:
        """Whether the scorer replica count is left to Serve's autoscaler."""
        return self.scorer_max_replicas is not None

    def scorer_autoscaling_config(self) -> dict[str, Any] | None:
        """The ``autoscaling_config`` for the ``PatchScorer`` deployment, or ``None`` (fixed count)."""
        if self.scorer_max_replicas is None:
            return None
        return {
            "min_replicas": self.scorer_min_replicas,
            "max_replicas": self.scorer_max_replicas,
            "target_ongoing_requests": self.scorer_target_ongoing,
        }

    def updated(self, overrides: Mapping[str, object]) -> ServingConfig:
        """A validated copy with ``overrides`` (field name → value; strings are parsed) applied."""
        unknown = sorted(set(overrides) - set(SERVING_VARIABLES))
        if unknown:
            msg = f"unknown serving option(s) {unknown}; expected some of {sorted(SERVING_VARIABLES)}"
            raise ValueError(msg)
        return ServingConfig.model_validate({**self.model_dump(), **overrides})


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""What a ``REDIS_URL`` may start with (redis-py's ``from_url``)."""
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def s3_uses_tls(endpoint: str | None, secure: bool) -> bool:
    """Whether an S3 client talks TLS to ``endpoint``: when ``secure`` is set or the endpoint is ``https://``.

    The one rule for every client, so that no two parts of the stack disagree about the same store::

        s3_uses_tls("https://s3.example:443", False)   # True
        s3_uses_tls("minio:9000", True)                # True
        s3_uses_tls("http://minio:9000", False)        # False
    """
    return secure or (endpoint or "").startswith("https://")


class Settings(BaseModel):
    """Connection and service settings. Secrets are `SecretStr` and never printed."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)  # a bad value may be a secret

    redis_url: SecretStr | None = None
    s3_endpoint: str | None = None
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = False
    """TLS for a bare ``host:port`` endpoint; an ``https://`` one uses TLS anyway (`s3_tls` decides)."""
    s3_region: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,32}$")
    bucket: str = Field(default="anomap", pattern=BUCKET_PATTERN)
    reference_buckets: tuple[Annotated[str, Field(pattern=BUCKET_PATTERN)], ...] = ()
    """Buckets besides ``bucket`` that ``s3://`` references in jobs and confirmations may name; a reference to
    any other is a ``forbidden_object`` dead letter, unread (`trainer.store.ObjectStore.read_reference`)."""
    ray_address: str | None = None
    stream_prefix: str = Field(default="anomap", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    model_name: str = Field(default="metal", pattern=MODEL_NAME_PATTERN)
    state_dir: Path = Path(".anomap")
    done_ttl_s: int = Field(default=7 * 24 * 3600, ge=3600, le=90 * 24 * 3600)
    """Lifetime of the consumers' done/settled markers (`ConsumerConfig.done_ttl_s`)."""
    serving: ServingConfig = ServingConfig()

    @field_validator("redis_url")
    @classmethod
    def _redis_url_has_a_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(REDIS_SCHEMES):
            schemes = ", ".join(REDIS_SCHEMES)
            msg = f"REDIS_URL must start with {schemes} (its value is not shown: it may hold a password)"
            raise ValueError(msg)
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_has_no_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.removeprefix("http://").removeprefix("https://")
        if "@" in host:  # user:secret@host: the value would be printed in status and errors
            msg = (
                "S3_ENDPOINT must be host:port or http(s)://host:port without user or password (its value is "
                "not shown: it may hold a secret); set S3_ACCESS_KEY and S3_SECRET_KEY for the keys"
            )
            raise ValueError(msg)
        if not host or "/" in host.rstrip("/"):
            msg = f"S3_ENDPOINT must be host:port or http(s)://host:port, got {value!r}"
            raise ValueError(msg)
        return value

    @property
    def s3_host(self) -> str | None:
        """The endpoint without scheme, as the minio client wants it."""
        if self.s3_endpoint is None:
            return None
        return self.s3_endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")

    @property
    def s3_tls(self) -> bool:
        """Whether S3 clients use TLS: ``s3_secure`` or an ``https://`` endpoint (`s3_uses_tls`)."""
        return s3_uses_tls(self.s3_endpoint, self.s3_secure)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default: `os.environ`); unset variables keep defaults."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value else None

        endpoint = get("S3_ENDPOINT")
        secure_flag = get("S3_SECURE")
        if secure_flag is not None and secure_flag.lower() not in TRUE_WORDS | FALSE_WORDS:
            msg = f"S3_SECURE must be one of {sorted(TRUE_WORDS | FALSE_WORDS)}, got {secure_flag!r}"
            raise ValueError(msg)
        secure = (
            secure_flag.lower() in TRUE_WORDS
            if secure_flag is not None
            else bool(endpoint and endpoint.startswith("https://"))
        )
        if not secure and s3_uses_tls(endpoint, secure):
            msg = f"S3_SECURE={secure_flag} contradicts an https:// S3_ENDPOINT; unset S3_SECURE or use http://"
            raise ValueError(msg)
        values: dict[str, object] = {
            "redis_url": get("REDIS_URL"),
            "s3_endpoint": endpoint,
            "s3_access_key": get("S3_ACCESS_KEY"),
            "s3_secret_key": get("S3_SECRET_KEY"),
            "s3_secure": secure,
            "s3_region": get("S3_REGION"),
            "ray_address": get("RAY_ADDRESS"),
        }
        optional = {
            "bucket": "ANOMAP_BUCKET",
            "stream_prefix": "ANOMAP_STREAM_PREFIX",
            "model_name": "ANOMAP_MODEL_NAME",
            "state_dir": "ANOMAP_STATE_DIR",
            "done_ttl_s": "ANOMAP_DONE_TTL_S",
        }
        for field, variable in optional.items():
            if (value := get(variable)) is not None:
                values[field] = value
        if (listed := get("ANOMAP_REFERENCE_BUCKETS")) is not None:
            values["reference_buckets"] = tuple(name.strip() for name in listed.split(",") if name.strip())
        serving = {field: value for field, name in SERVING_VARIABLES.items() if (value := get(name)) is not None}
        if serving:
            values["serving"] = serving
        try:
            return cls.model_validate(values)
        except ValidationError as exc:  # named by field, without the values (pydantic would print a bad secret)
            variables = {
                "redis_url": "REDIS_URL",
                "s3_region": "S3_REGION",
                "reference_buckets": "ANOMAP_REFERENCE_BUCKETS",
                **optional,
                **SERVING_VARIABLES,
            }
            problems = []
            for error in exc.errors():
                field = ".".join(map(str, error["loc"])) or "settings"
                variable = next(
                    (variables[str(part)] for part in reversed(error["loc"]) if str(part) in variables), None
                )
                problems.append(f"{field}{f' ({variable})' if variable else ''}: {error['msg']}")
            msg = f"invalid settings from the environment: {'; '.join(problems)}"
            raise ValueError(msg) from None
