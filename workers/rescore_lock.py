"""The marker object that keeps one rescore run per (model version, source): `RunLock`.

    lock = RunLock(store, lock_key(version, tag), run_marker(run_id, source), subject="s3://a/lot7 with v1")
    lock.acquire(force=False)    # RescoreBusy naming the other run when its heartbeat is fresh
    ...                          # a thread rewrites the marker every heartbeat_s; lock.lost says if it was taken
    lock.release()               # deletes the marker if it is still this run's

A rescore has no Redis connection, so the lock lives in the object store beside the manifest
(`workers.rescore_manifest.lock_key`), written with conditional PUTs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime

from minio.error import S3Error

from trainer.store import ObjectStore
from workers.rescore_manifest import LOCK_HEARTBEAT_S, LOCK_STALE_S, LockState, RunMarker, lock_state

log = logging.getLogger("anomap.rescore")

_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
"""What S3 answers a conditional write (If-None-Match, If-Match) that lost."""


class RescoreBusy(RuntimeError):
    """Another run is scoring the same source with the same version (or took this run's marker over)."""


def run_marker(run_id: str, source: str) -> RunMarker:
    """This process's marker for run ``run_id`` of ``source``, started and beating now."""
    now = datetime.now(UTC)
    return RunMarker(run_id, source, socket.gethostname(), os.getpid(), now, now)


class RunLock:
    """The marker object that keeps a second run of one (version, source) out while this run goes on.

        lock = RunLock(store, lock_key(version, tag), marker, subject="s3://a/lot7 with v1")
        lock.acquire(force=False)    # RescoreBusy naming the other run when its heartbeat is fresh
        ...                          # a thread rewrites the marker every heartbeat_s; lock.lost says if it was taken
        lock.release()               # deletes the marker if it is still this run's

    Writes are conditional (``If-None-Match: *`` to create, ``If-Match: <etag>`` to take over or beat), so
    two runs starting together cannot both get it on stores that honour them (AWS S3, MinIO, SeaweedFS);
    reading the marker back after writing it covers stores that ignore them.
    """

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        marker: RunMarker,
        subject: str,
        stale_s: float = LOCK_STALE_S,
        heartbeat_s: float = LOCK_HEARTBEAT_S,
    ) -> None:
        self.store, self.key, self.marker, self.subject = store, key, marker, subject
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.lost: str | None = None
        """Set by the heartbeat when another run took the marker (it describes that run)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, force: bool = False) -> RunMarker | None:
        """Take the marker; returns the marker of the run it took over (stale, or live with ``force``), None if
        it was free. Raises `RescoreBusy` naming the other run when that run's heartbeat is fresh."""
        now = datetime.now(UTC)
        exists, current, etag = self._read()
        state = lock_state(current, exists, now, self.stale_s, force)
        if state is LockState.HELD:
            assert current is not None
            raise RescoreBusy(self._busy(current, now))
        condition = {"If-Match": f'"{etag}"'} if exists and etag else {"If-None-Match": "*"}
        written = self._put(self.marker.beat(now), condition)
        _, mine, _ = self._read()
        if written is None or mine is None or mine.run_id != self.marker.run_id:
            other = f"{mine.describe(now)}" if mine is not None else "another run"
            raise RescoreBusy(f"{other} took {self.store.ref(self.key)} at the same moment; {self.subject} is theirs")
        self._thread = threading.Thread(target=self._beat, name="rescore-lock-heartbeat", daemon=True)
        self._thread.start()
        return current if state is LockState.STALE else None

    def release(self) -> None:
        """Stop the heartbeat and delete the marker if it is still this run's (best effort: a marker left
        behind is taken over once it is ``stale_s`` old)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            _, current, _ = self._read()
            if current is not None and current.run_id == self.marker.run_id:
                self.store.delete(self.key)
        except Exception as exc:
            log.warning("could not remove %s (the next run takes it over when stale): %r", self.key, exc)

    def _busy(self, other: RunMarker, now: datetime) -> str:
        return (
            f"another rescore of {self.subject} is running: {other.describe(now)} (marker {self.store.ref(self.key)}); "
            f"wait for it to finish, or if it died run again with --force (a marker whose heartbeat is "
            f"{self.stale_s:.0f} s old is taken over without it)"
        )

    def _read(self) -> tuple[bool, RunMarker | None, str | None]:
        """(whether the marker object exists, its content if readable, its ETag)."""
        try:
            response = self.store.client.get_object(self.store.bucket, self.key)
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject"}:
                return False, None, None
            raise
        try:
            data, etag = response.read(), (response.headers.get("etag") or "").strip('"') or None
        finally:
            response.close()
            response.release_conn()
        try:
            return True, RunMarker.from_json(data), etag
        except ValueError:
            return True, None, etag

    def _put(self, marker: RunMarker, condition: dict[str, str]) -> str | None:
        """Write ``marker`` if ``condition`` holds; its ETag, None when the condition failed. minio-py's
        ``put_object`` turns such headers into metadata, so this makes the signed request itself."""
        headers = {"Content-Type": "application/json", **condition}
        try:
            response = self.store.client._execute(  # private: see the docstring
                "PUT", self.store.bucket, self.key, body=marker.to_json(), headers=headers
            )
        except S3Error as exc:
            if exc.code in _CONFLICT_CODES:
                return None
            raise
        self.marker = marker
        return (response.headers.get("etag") or "").strip('"') or "written"

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                now = datetime.now(UTC)
                _, current, etag = self._read()
                if current is None or current.run_id != self.marker.run_id or etag is None:
                    self.lost = current.describe(now) if current is not None else "the marker was removed"
                    return
                if self._put(self.marker.beat(now), {"If-Match": f'"{etag}"'}) is None:
                    self.lost = "another run wrote the marker meanwhile"
                    return
            except Exception as exc:  # the store is away: beat again later (stale only after stale_s)
                log.warning("could not renew %s: %r", self.key, exc)
