"""Archives to re-score: an ``s3://bucket/prefix`` in the configured store, or a local folder.

    source = ArchiveSource.parse("s3://archive/2025/lot7")    # or ArchiveSource.parse("/data/lot7")
    images = source.list_images(store)                       # [ArchiveImage], sorted by relative path
    data = source.read(store, images[0])                     # the file's bytes

Images are found recursively by suffix (.png .jpg .jpeg .tif .tiff .bmp, any case); in a local
folder, symbolic links to folders are followed (each folder once), and folders that cannot be read
are collected in ``unreadable`` rather than skipped without a word. An image's identity in a manifest
is ``ArchiveImage.image``: ``s3://bucket/key``, or the absolute path of a local file (`manifest_name`
of it when the path is not valid UTF-8). A local folder is read by the scoring actors, so on a
cluster of several nodes it must be a path every node sees (a shared file system); an ``s3://``
source works anywhere.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from minio.error import S3Error

from schemas.ids import BUCKET_PATTERN
from trainer.store import ObjectStore
from workers.rescore_manifest import RESCORE_PREFIX, is_image_name


def manifest_name(text: str) -> str:
    """``text`` as a manifest can store it: unchanged when it is valid UTF-8; a local file name that is not
    (Python keeps such bytes as lone surrogates) with those bytes written as ``\\xNN`` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class SourceError(ValueError):
    """The source is not an existing folder or a readable ``s3://bucket[/prefix]``."""


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
                if obj.is_dir or not is_image_name(key):
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
                if not is_image_name(name):
                    continue
                path = Path(folder, name)
                try:
                    size = path.stat().st_size
                except OSError:  # a dangling link: the actor reports it as a missing object
                    size = -1
                found.append(ArchiveImage(str(path), path.relative_to(root).as_posix(), size))
        return sorted(found, key=lambda image: image.relative)

    def read(self, store: ObjectStore, image: ArchiveImage) -> bytes:
        """The bytes of ``image``. Raises `trainer.store.ObjectMissing` / OSError when it is gone;
        connection errors propagate (callers retry)."""
        if self.root is not None:
            return Path(image.image).read_bytes()
        assert self.bucket is not None
        return store.get_bytes(image.image.removeprefix(f"s3://{self.bucket}/"), self.bucket)
