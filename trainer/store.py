"""`ObjectStore`: the few object-store operations anomap needs, over any S3 store (MinIO client);
`CheckpointStorage`: where Ray Train runs keep their checkpoints (the same store, or a local folder).

Keys are built by callers from validated ids only. Every method raises `ObjectMissing` for an
absent key, and lets connection errors (``urllib3`` / ``minio.error.S3Error``) propagate so that
callers can retry.

    >>> storage = CheckpointStorage.object_store(settings)     # pyarrow S3 filesystem on the same store
    >>> str(storage), storage.run_path("metal-v1")
    ('s3://anomap/train-runs', 'anomap/train-runs/metal-v1')
    >>> str(CheckpointStorage.local("/tmp/runs"))
    '/tmp/runs'
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from minio import Minio
from minio.error import S3Error
from minio.lifecycleconfig import LifecycleConfig

from schemas import Settings
from schemas.ids import S3Ref

if TYPE_CHECKING:
    import pyarrow.fs

TRAIN_RUNS_PREFIX = "train-runs"
"""Key prefix, in the settings' bucket, under which Ray Train writes one folder per run."""
DEFAULT_S3_REGION = "us-east-1"
"""Region requests are signed for when ``S3_REGION`` is unset (MinIO's and SeaweedFS's default)."""

_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}
FORBIDDEN_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidObjectState"})
"""S3 error codes that mean "this object may not be read with these keys, now or on a retry" (an archived
object, ``InvalidObjectState``, needs a restore first)."""
_READ_CHUNK = 1 << 20
"""Bytes per read of a bounded `ObjectStore.get_bytes`."""


def describe_store_error(exc: BaseException) -> str:
    """One line for a failed store call: what the store answered and for which object
    (``the store answered AccessDenied (Access Denied.) for s3://b/k``), or the error's repr when it did not
    answer (a refused connection, a timeout)."""
    if not isinstance(exc, S3Error):
        return repr(exc)
    target = f"s3://{exc.bucket_name}/{exc.object_name}" if exc.object_name else f"bucket {exc.bucket_name}"
    where = f" for {target}" if exc.bucket_name else ""
    return f"the store answered {exc.code} ({exc.message}){where}"


class ObjectMissing(KeyError):
    """The object (or its bucket) does not exist."""


class ObjectForbidden(Exception):
    """The object may not be read: the store refused (`FORBIDDEN_CODES`), or a reference names a bucket that
    references may not name (`ObjectStore.read_reference`)."""


class ObjectTooLarge(ValueError):
    """The object is larger than the reader allows (``size``: its bytes as declared, or the bytes read when
    the limit was passed)."""

    def __init__(self, ref: str, size: int, limit: int) -> None:
        super().__init__(f"{ref} is {size} bytes; at most {limit} are allowed")
        self.ref, self.size, self.limit = ref, size, limit


class ObjectStore:
    """A bucket in an S3 store; ``reference_buckets``: the other buckets that jobs' and confirmations'
    ``s3://`` references may name (`read_reference`)."""

    def __init__(self, client: Minio, bucket: str, reference_buckets: Iterable[str] = ()) -> None:
        self.client = client
        self.bucket = bucket
        self.reference_buckets = frozenset(reference_buckets)

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore:
        """Connect to the store named by ``settings`` (endpoint and keys must be set; TLS as ``settings.s3_tls``)."""
        if settings.s3_host is None or settings.s3_access_key is None or settings.s3_secret_key is None:
            msg = "S3_ENDPOINT, S3_ACCESS_KEY and S3_SECRET_KEY must all be set (or start the embedded stack)"
            raise ValueError(msg)
        client = Minio(
            settings.s3_host,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_tls,
            region=settings.s3_region,
        )
        return cls(client, settings.bucket, settings.reference_buckets)

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

    def get_bytes(self, key: str, bucket: str | None = None, max_bytes: int | None = None) -> bytes:
        """Read a whole object; raises `ObjectMissing` if it does not exist, and `ObjectTooLarge` if it holds
        more than ``max_bytes`` (checked against its declared length before reading, and while reading)."""
        ref = f"s3://{bucket or self.bucket}/{key}"
        try:
            response = self.client.get_object(bucket or self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ObjectMissing(ref) from exc
            if exc.code in FORBIDDEN_CODES:
                raise ObjectForbidden(f"the store refuses to read {ref}: {exc.code}") from exc
            raise
        try:
            if max_bytes is None:
                return response.read()
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ObjectTooLarge(ref, int(declared), max_bytes)
            data = bytearray()
            for chunk in response.stream(_READ_CHUNK):
                data.extend(chunk)
                if len(data) > max_bytes:
                    raise ObjectTooLarge(ref, len(data), max_bytes)
            return bytes(data)
        finally:
            response.close()
            response.release_conn()

    def read_reference(self, ref: S3Ref, max_bytes: int) -> bytes:
        """Read the object a job's ``image_ref`` or a confirmation's ``mask_ref`` names, at most ``max_bytes``.

        Only this bucket and ``reference_buckets`` may be named: a publisher's reference must not make the
        service read whatever its keys can reach. Raises `ObjectForbidden` for another bucket (unread) or
        when the store refuses, and as `get_bytes` otherwise.
        """
        if ref.bucket != self.bucket and ref.bucket not in self.reference_buckets:
            allowed = ", ".join(sorted(self.reference_buckets)) or "none"
            msg = (
                f"{ref} is in bucket {ref.bucket!r}; references may name only {self.bucket!r} and the buckets "
                f"in ANOMAP_REFERENCE_BUCKETS ({allowed})"
            )
            raise ObjectForbidden(msg)
        return self.get_bytes(ref.key, ref.bucket, max_bytes=max_bytes)

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

    def lifecycle(self) -> LifecycleConfig | None:
        """The bucket's lifecycle configuration (expiry rules), None when it has none."""
        try:
            return self.client.get_bucket_lifecycle(self.bucket)
        except S3Error as exc:
            if exc.code == "NoSuchLifecycleConfiguration":  # some stores answer so instead of an empty body
                return None
            raise

    def set_lifecycle(self, config: LifecycleConfig | None) -> None:
        """Replace the bucket's lifecycle configuration; None deletes it."""
        if config is None:
            self.client.delete_bucket_lifecycle(self.bucket)
        else:
            self.client.set_bucket_lifecycle(self.bucket, config)


def s3_filesystem(settings: Settings, *, connect_timeout: float = 5.0) -> pyarrow.fs.S3FileSystem:
    """A pyarrow S3 filesystem on the store named by ``settings`` (endpoint, keys, TLS flag, region).

    Paths on it are ``bucket/key``. Keys left unset fall back to the AWS SDK's own chain (environment,
    ``~/.aws``). The secret key is in the object (Ray pickles it to its workers) but in no repr or log:
    pyarrow prints ``<pyarrow._s3fs.S3FileSystem object at …>``. With TLS, certificates are checked
    against ``SSL_CERT_FILE`` or certifi's bundle, as for the MinIO client.
    """
    import certifi
    import pyarrow.fs

    if settings.s3_host is None:
        msg = "no S3 store configured: set S3_ENDPOINT (+ S3_ACCESS_KEY, S3_SECRET_KEY) or start the embedded stack"
        raise ValueError(msg)
    secure = settings.s3_tls
    return pyarrow.fs.S3FileSystem(
        access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        region=settings.s3_region or DEFAULT_S3_REGION,  # explicit: no probing of EC2 metadata for one
        scheme="https" if secure else "http",
        endpoint_override=settings.s3_host,
        connect_timeout=connect_timeout,
        tls_ca_file_path=(os.environ.get("SSL_CERT_FILE") or certifi.where()) if secure else None,
    )


@dataclass(frozen=True)
class CheckpointStorage:
    """Where Ray Train keeps its runs: ``path`` on ``filesystem``, one folder per run name.

    ``filesystem`` None means ``path`` is a local directory (or a URI Ray Train resolves itself).
    Pass both to ``RunConfig(storage_path=path, storage_filesystem=filesystem)``.
    """

    path: str
    filesystem: pyarrow.fs.FileSystem | None = field(default=None, compare=False)
    uri: str = ""
    """How to show the location to people (``s3://bucket/prefix`` or the path); never holds a secret."""

    @classmethod
    def local(cls, directory: str | os.PathLike[str]) -> CheckpointStorage:
        """A local (or shared, e.g. NFS) directory; made absolute, created by Ray Train when needed."""
        path = str(Path(directory).expanduser().resolve())
        return cls(path, None, path)

    @classmethod
    def object_store(cls, settings: Settings, prefix: str = TRAIN_RUNS_PREFIX) -> CheckpointStorage:
        """``<bucket>/<prefix>`` on the S3 store of ``settings`` (the bucket must exist)."""
        path = f"{settings.bucket}/{prefix.strip('/')}"
        return cls(path, s3_filesystem(settings), f"s3://{path}")

    def run_path(self, run_name: str) -> str:
        """The folder of run ``run_name``, as a path on ``filesystem``."""
        return f"{self.path.rstrip('/')}/{run_name}"

    def files(self) -> pyarrow.fs.FileSystem:
        """The filesystem the paths are on: ``filesystem``, or the local one."""
        import pyarrow.fs

        return self.filesystem or pyarrow.fs.LocalFileSystem()

    def delete_run(self, run_name: str) -> bool:
        """Delete run ``run_name``'s folder (its checkpoints and manifest); False when there was none.
        Raises OSError when the storage fails."""
        import pyarrow.fs

        files, path = self.files(), self.run_path(run_name)
        if files.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return False
        files.delete_dir(path)
        return True

    def __str__(self) -> str:
        return self.uri or self.path
