"""A re-scoring run's manifest in the store: its Parquet parts read (`scored_images`, `read_manifest`) and
written (`ManifestWriter`), and the errors that end a run when they cannot be.

    done = scored_images(store, version)        # every image a part of the version has a row for
    writer = ManifestWriter(store, version, run_id, flush_rows=500, flush_s=60.0)
    writer.add(rows); writer.flush()             # rescore/<version>/manifest/part-<run>-<seq>.parquet
    table = read_manifest(store, version)        # the latest row per image

The keys, schema and row rules are `workers.rescore_manifest`'s (no I/O there).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from minio.error import S3Error

from trainer.store import ObjectStore
from workers.rescore_actor import STORE_RETRY_S, retry_transient, root_cause
from workers.rescore_manifest import RowStatus, latest_rows, manifest_prefix, part_key, rows_table


class ManifestError(ValueError):
    """A manifest part cannot be read: which images are done is unknown, so no run starts."""


class ManifestWriteError(RuntimeError):
    """Manifest rows could not be written past their retries; the message says what was and was not recorded."""


def _read_part(store: ObjectStore, key: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One manifest part; raises `ManifestError` naming it when it is not Parquet of the manifest's columns."""
    try:
        return pq.read_table(io.BytesIO(store.get_bytes(key)), columns=list(columns) if columns else None)
    except (pa.ArrowException, OSError) as exc:
        msg = (
            f"manifest part {store.ref(key)} cannot be read ({exc}); move it away (its images are then scored "
            "again) or restore it, then run again"
        )
        raise ManifestError(msg) from exc


def _part_keys(store: ObjectStore, version: str) -> list[str]:
    return sorted(key for key in store.list_keys(manifest_prefix(version)) if key.endswith(".parquet"))


def scored_images(store: ObjectStore, version: str) -> set[str]:
    """The ``image`` of every row in the manifest parts of ``version`` (ok or bad); `ManifestError` when a
    part cannot be read."""
    done: set[str] = set()
    for key in _part_keys(store, version):
        done.update(_read_part(store, key, ["image"]).column("image").to_pylist())
    return done


def read_manifest(store: ObjectStore, version: str) -> pa.Table:
    """The manifest of ``version``: one row per image, the latest one where runs left several (`latest_rows`)."""
    parts = [_read_part(store, key) for key in _part_keys(store, version)]
    if not parts:
        return rows_table([])
    return latest_rows(pa.concat_tables(parts, promote_options="permissive"))


class ManifestWriter:
    """Buffers manifest rows (ok and bad; error rows are dropped) and writes them as Parquet parts.

    A write is retried for ``retry_s`` while the store may come back (`is_transient_error`); then, or at
    once for any other failure, `ManifestWriteError` names the part and what was recorded, and the writer
    writes nothing more (``failed``).
    """

    def __init__(
        self,
        store: ObjectStore,
        version: str,
        run_id: str,
        flush_rows: int,
        flush_s: float,
        retry_s: float = STORE_RETRY_S,
    ) -> None:
        self.store, self.version, self.run_id = store, version, run_id
        self.flush_rows, self.flush_s, self.retry_s = flush_rows, flush_s, retry_s
        self.parts: list[str] = []
        self.recorded = 0
        """Rows written in ``parts``."""
        self.failed = False
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._last = time.monotonic()

    def add(self, table: pa.Table) -> None:
        """Keep the rows of ``table`` (`MANIFEST_SCHEMA`) that belong in the manifest; flush when due."""
        kept = table.filter(pc.not_equal(table.column("status"), str(RowStatus.ERROR)))
        if kept.num_rows:
            self._tables.append(kept)
            self._rows += kept.num_rows
        if self._rows >= self.flush_rows or (self._rows and time.monotonic() - self._last >= self.flush_s):
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next part (nothing if none); `ManifestWriteError` when it cannot."""
        if self._rows and not self.failed:
            buffer = io.BytesIO()
            pq.write_table(pa.concat_tables(self._tables), buffer, compression="zstd")
            key, data = part_key(self.version, self.run_id, len(self.parts)), buffer.getvalue()
            try:
                self._put(key, data)
            except Exception as exc:
                self.failed = True
                raise ManifestWriteError(self._failure(key, exc)) from exc
            self.parts.append(key)
            self.recorded += self._rows
            self._tables, self._rows = [], 0
        self._last = time.monotonic()

    def _put(self, key: str, data: bytes) -> None:
        retry_transient(  # a blip of the store must not end a long run
            lambda: self.store.put_bytes(key, data, "application/vnd.apache.parquet"),
            f"writing {key}",
            self.retry_s,
            threading.Event(),
        )

    def _failure(self, key: str, exc: BaseException) -> str:
        exc = root_cause(exc)
        cause = f"{exc.code} ({exc.message})" if isinstance(exc, S3Error) else repr(exc)
        return (
            f"could not write manifest part {self.store.ref(key)}: {cause}; not recorded: {self._rows} rows "
            f"(their maps are stored; a re-run scores those images again); recorded by this run: {self.recorded} "
            f"rows in {len(self.parts)} parts"
        )
