"""Archives to re-score: an ``s3://bucket/prefix`` in the configured store, or a local folder.

    source = ArchiveSource.parse("s3://archive/2025/lot7")    # or ArchiveSource.parse("/data/lot7")
    images = source.list_images(store)                       # [ArchiveImage], sorted by relative path
    data = source.read(store, images[0])                     # the file's bytes

Images are found recursively by suffix (.png .jpg .jpeg .tif .tiff .bmp, any case), plus the
consumer's kept images: a name without any ``.`` directly in a folder named ``scored``
(``images/<line>/scored/<job_id>``, `workers.scored_images`; the decoder tells the format from the
bytes). In a local folder, symbolic links to folders are followed (each folder once), and folders
that cannot be read are collected in ``unreadable`` rather than skipped without a word. An image's
identity in a manifest is ``ArchiveImage.image``: ``s3://bucket/key``, or the absolute path of a
local file (`manifest_name` of it when the path is not valid UTF-8). A local folder is read by the
scoring actors, so on a cluster of several nodes it must be a path every node sees (a shared file
system); an ``s3://`` source works anywhere.

`ArchiveSource.read` raises `UnreadableImage` for what no retry will fix — the object or file is gone,
forbidden (``AccessDenied``, EACCES, EPERM), archived (``InvalidObjectState``), a link loop, a name too
long, or not a regular file (a FIFO named ``x.png`` would block a reader forever, so it is never
opened) — and lets the rest propagate; `is_transient_error` says which of those are worth a retry.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import urllib3.exceptions
from minio.error import InvalidResponseError, S3Error, ServerError

from schemas.ids import BUCKET_PATTERN
from trainer.store import FORBIDDEN_CODES, ObjectForbidden, ObjectMissing, ObjectStore
from workers.rescore_manifest import IMAGE_SUFFIXES, RESCORE_PREFIX, is_image_name

SCORED_FOLDER = "scored"
"""The consumer keeps each job's image bytes as ``images/<line>/scored/<job_id>``: no suffix."""
PERMANENT_S3_CODES = FORBIDDEN_CODES | {"MethodNotAllowed", "NoSuchBucket", "NoSuchKey"}
"""S3 error codes of a read that no retry fixes (forbidden, archived to a cold tier, gone)."""
TRANSIENT_S3_CODES = frozenset(
    {"InternalError", "OperationAborted", "RequestTimeout", "ServiceUnavailable", "SlowDown", "ThrottlingException"}
)
"""S3 error codes of a store that is busy or briefly away: worth a retry."""
PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.ENXIO,
        errno.ENODEV,
    }
)
"""errno values of a local read that no retry fixes (EIO, ESTALE of a network share are retried)."""


def manifest_name(text: str) -> str:
    """``text`` as a manifest can store it: unchanged when it is valid UTF-8; a local file name that is not
    (Python keeps such bytes as lone surrogates) with those bytes written as ``\\xNN`` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class SourceError(ValueError):
    """The source is not an existing folder or a readable ``s3://bucket[/prefix]``, or holds no images."""


class UnreadableImage(Exception):
    """An image that cannot be read and will not be by retrying; the message says why (code, errno)."""


def is_listed_image(path: str) -> bool:
    """Whether a key or path (``/``-separated) is an image to score: an image suffix, or a name without
    any ``.`` directly in a ``scored`` folder (the consumer's kept images)."""
    folder, _, name = path.rpartition("/")
    return is_image_name(path) or (bool(name) and "." not in name and folder.rpartition("/")[2] == SCORED_FOLDER)


def no_images_message(uri: str, unreadable: list[str]) -> str:
    """Why a source gave nothing to score, for a `SourceError`."""
    suffixes = " ".join(sorted(IMAGE_SUFFIXES))
    message = (
        f"{uri} has no images to score (files ending in {suffixes}, or names without a '.' in a "
        f"'{SCORED_FOLDER}/' folder); check the folder or the s3:// prefix"
    )
    if unreadable:
        message += f"; could not read: {'; '.join(unreadable[:5])}" + (" …" if len(unreadable) > 5 else "")
    return message


def permanent_read_detail(image: str, exc: BaseException) -> str | None:
    """What makes reading ``image`` fail for good, naming the S3 code or errno; None when a retry might help."""
    if isinstance(exc, ObjectMissing):
        return f"{image} does not exist (any more)"
    if isinstance(exc, ObjectForbidden):
        return str(exc)  # "the store refuses to read s3://…: AccessDenied"
    if isinstance(exc, S3Error) and exc.code in PERMANENT_S3_CODES:
        return f"cannot read {image}: {exc.code} ({exc.message})"
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return f"cannot read {image}: {errno.errorcode[exc.errno]} ({exc.strerror})"
    return None


def is_transient_error(exc: BaseException) -> bool:
    """Whether a failed read or write may pass by itself: the connection, a busy store (5xx, throttling), or
    an I/O error of a network share. Not the permanent ones (`permanent_read_detail`), not unknown S3 codes,
    not a bug (any other exception)."""
    if permanent_read_detail("", exc) is not None:
        return False
    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_S3_CODES
    return isinstance(exc, OSError | urllib3.exceptions.HTTPError | ServerError | InvalidResponseError)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    kinds += ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def read_regular_file(path: str) -> bytes:
    """The bytes of the regular file ``path`` (links followed). Raises `UnreadableImage` when it is anything
    else (never opened: a FIFO would block) or cannot be read for good; other OSErrors propagate."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableImage(f"{path} is not a regular file ({_file_kind(info.st_mode)})")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):  # replaced between the two looks
                raise UnreadableImage(f"{path} is not a regular file ({_file_kind(mode)})")
            return file.read()
    except OSError as exc:
        detail = permanent_read_detail(path, exc)
        if detail is not None:
            raise UnreadableImage(detail) from exc
        raise


@dataclass(frozen=True)
class ArchiveImage:
    """One image file of an archive. ``size`` in bytes (-1 when it could not be read)."""

    image: str
    """``s3://bucket/key`` or the absolute local path: the image's identity in the manifest."""
    relative: str
    """The path below the source, ``/``-separated."""
    size: int


@dataclass(frozen=True)
class ArchiveSource:
    """Where the images are: ``bucket`` and a key ``prefix`` (``""`` or ending in ``/``), or a local ``root``."""

    uri: str
    bucket: str | None = None
    prefix: str = ""
    root: Path | None = None

    @classmethod
    def parse(cls, source: str) -> ArchiveSource:
        """``s3://bucket[/prefix]`` or a folder (which must exist)."""
        if source.startswith("s3://"):
            bucket, _, prefix = source.removeprefix("s3://").partition("/")
            if not re.fullmatch(BUCKET_PATTERN, bucket):
                msg = f"invalid bucket name {bucket[:80]!r} in {source[:120]!r}"
                raise SourceError(msg)
            prefix = prefix.strip("/")
            prefix = f"{prefix}/" if prefix else ""
            return cls(uri=f"s3://{bucket}/{prefix}".rstrip("/"), bucket=bucket, prefix=prefix)
        root = Path(source).expanduser().resolve()
        if not root.is_dir():
            msg = f"{source} is not a folder (expected a folder of images or s3://bucket/prefix)"
            raise SourceError(msg)
        return cls(uri=str(root), root=root)

    def list_images(self, store: ObjectStore, unreadable: list[str] | None = None) -> list[ArchiveImage]:
        """Every image below the source, sorted by relative path; local folders that could not be read are
        appended to ``unreadable`` (as ``"<path>: <error>"``).

        In the store's own bucket, ``rescore/`` (re-scoring output) is left out.
        """
        if self.root is not None:
            return self._list_folder(self.root, [] if unreadable is None else unreadable)
        assert self.bucket is not None
        found: list[ArchiveImage] = []
        try:
            for obj in store.client.list_objects(self.bucket, prefix=self.prefix, recursive=True):
                key = obj.object_name
                if obj.is_dir or not is_listed_image(key):
                    continue
                if self.bucket == store.bucket and key.startswith(f"{RESCORE_PREFIX}/"):
                    continue
                found.append(ArchiveImage(f"s3://{self.bucket}/{key}", key[len(self.prefix) :], int(obj.size or 0)))
        except S3Error as exc:
            msg = f"cannot list {self.uri}: {exc.code} ({exc.message})"
            raise SourceError(msg) from exc
        return sorted(found, key=lambda image: image.relative)

    @staticmethod
    def _list_folder(root: Path, unreadable: list[str]) -> list[ArchiveImage]:
        found = []
        seen: set[tuple[int, int]] = set()  # (device, inode) of the folders walked: a link loop ends here

        def report(error: OSError) -> None:
            unreadable.append(manifest_name(f"{error.filename}: {error.strerror or error}"))

        for folder, subfolders, files in os.walk(root, onerror=report, followlinks=True):
            try:
                info = os.stat(folder)
            except OSError as exc:
                report(exc)
                subfolders.clear()
                continue
            if (info.st_dev, info.st_ino) in seen:
                subfolders.clear()
                continue
            seen.add((info.st_dev, info.st_ino))
            for name in files:
                path = Path(folder, name)
                if not is_listed_image(path.as_posix()):
                    continue
                try:
                    size = path.stat().st_size
                except OSError:  # a dangling link: the actor reports it as a missing object
                    size = -1
                found.append(ArchiveImage(str(path), path.relative_to(root).as_posix(), size))
        return sorted(found, key=lambda image: image.relative)

    def read(self, store: ObjectStore, image: ArchiveImage) -> bytes:
        """The bytes of ``image``. Raises `UnreadableImage` when no retry will read it (gone, forbidden,
        archived, not a regular file); other errors propagate (`is_transient_error`: worth a retry)."""
        if self.root is not None:
            return read_regular_file(image.image)
        assert self.bucket is not None
        try:
            return store.get_bytes(image.image.removeprefix(f"s3://{self.bucket}/"), self.bucket)
        except (ObjectMissing, S3Error) as exc:
            detail = permanent_read_detail(image.image, exc)
            if detail is not None:
                raise UnreadableImage(detail) from exc
            raise
