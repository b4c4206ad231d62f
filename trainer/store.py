"""`ObjectStore`: the few object-store operations anomap needs, over any S3 store (MinIO client).

Keys are built by callers from validated ids only. Every method raises `ObjectMissing` for an
absent key, and lets connection errors (``urllib3`` / ``minio.error.S3Error``) propagate so that
callers can retry.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

from minio import Minio
from minio.error import S3Error

from schemas import Settings

_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}


class ObjectMissing(KeyError):
    """The object (or its bucket) does not exist."""


class ObjectStore:
    """A bucket in an S3 store."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore:
        """Connect to the store named by ``settings`` (endpoint and keys must be set)."""
        if settings.s3_host is None or settings.s3_access_key is None or settings.s3_secret_key is None:
            msg = "S3_ENDPOINT, S3_ACCESS_KEY and S3_SECRET_KEY must all be set (or start the embedded stack)"
            raise ValueError(msg)
        client = Minio(
            settings.s3_host,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
        )
        return cls(client, settings.bucket)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    def ref(self, key: str) -> str:
        """``s3://bucket/key`` of a key in this bucket."""
        return f"s3://{self.bucket}/{key}"

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write ``data`` under ``key`` (overwrites)."""
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get_bytes(self, key: str, bucket: str | None = None) -> bytes:
        """Read a whole object; raises `ObjectMissing` if it does not exist."""
        try:
            response = self.client.get_object(bucket or self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ObjectMissing(f"s3://{bucket or self.bucket}/{key}") from exc
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists in the bucket."""
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return False
            raise
        return True

    def list_keys(self, prefix: str, recursive: bool = True) -> Iterator[str]:
        """Object keys under ``prefix`` (folders too when not recursive, ending in ``/``)."""
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=recursive):
            yield obj.object_name

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        self.client.remove_object(self.bucket, key)
