"""`Settings`: where the stack is and how the service behaves, read from the environment.

| variable | meaning | default |
|---|---|---|
| ``REDIS_URL`` | ``redis://`` / ``rediss://`` URL, with password or ACL user | embedded Valkey |
| ``S3_ENDPOINT`` | ``host:port`` or ``http(s)://host:port`` of an S3 store | embedded ``weed mini`` |
| ``S3_ACCESS_KEY`` / ``S3_SECRET_KEY`` | S3 credentials | generated for the embedded store |
| ``S3_SECURE`` | ``1`` to use TLS | ``0`` unless the endpoint starts with ``https://`` |
| ``ANOMAP_BUCKET`` | bucket for models, maps, datasets, images | ``anomap`` |
| ``RAY_ADDRESS`` | an existing Ray cluster | embedded Ray head |
| ``ANOMAP_STREAM_PREFIX`` | prefix of every stream name | ``anomap`` |
| ``ANOMAP_MODEL_NAME`` | model name in the registry | ``metal`` |
| ``ANOMAP_STATE_DIR`` | where the embedded stack keeps its state and data | ``./.anomap`` |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from schemas.ids import BUCKET_PATTERN, MODEL_NAME_PATTERN


class Settings(BaseModel):
    """Connection and service settings. Secrets are `SecretStr` and never printed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: SecretStr | None = None
    s3_endpoint: str | None = None
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = False
    bucket: str = Field(default="anomap", pattern=BUCKET_PATTERN)
    ray_address: str | None = None
    stream_prefix: str = Field(default="anomap", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    model_name: str = Field(default="metal", pattern=MODEL_NAME_PATTERN)
    state_dir: Path = Path(".anomap")

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_has_no_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.removeprefix("http://").removeprefix("https://")
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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default: `os.environ`); unset variables keep defaults."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value else None

        endpoint = get("S3_ENDPOINT")
        secure_flag = get("S3_SECURE")
        secure = (
            secure_flag.lower() in {"1", "true", "yes"}
            if secure_flag is not None
            else bool(endpoint and endpoint.startswith("https://"))
        )
        values: dict[str, object] = {
            "redis_url": get("REDIS_URL"),
            "s3_endpoint": endpoint,
            "s3_access_key": get("S3_ACCESS_KEY"),
            "s3_secret_key": get("S3_SECRET_KEY"),
            "s3_secure": secure,
            "ray_address": get("RAY_ADDRESS"),
        }
        optional = {
            "bucket": "ANOMAP_BUCKET",
            "stream_prefix": "ANOMAP_STREAM_PREFIX",
            "model_name": "ANOMAP_MODEL_NAME",
            "state_dir": "ANOMAP_STATE_DIR",
        }
        for field, variable in optional.items():
            if (value := get(variable)) is not None:
                values[field] = value
        return cls.model_validate(values)
