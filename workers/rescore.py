"""Archive re-scoring on Ray Data with the service's scorer: ``anomap rescore SOURCE --model VERSION``.

    summary = rescore(settings, "s3://archive/lot7", version, RescoreOptions(concurrency=2), progress=print)
    summary.scored, summary.bad, summary.skipped      # e.g. 48, 2, 0; a second run: 0, 0, 50

The driver lists the source (`workers.archive`), leaves out every image already in a manifest part of
that version (ok or bad: the run is resumable), and makes a Ray Dataset of the rest (``from_items``,
one block per image up to `MAX_BLOCKS`). ``map_batches`` runs `workers.rescore_actor.ImageRescorer`, a
callable class, on ``concurrency`` actors: each loads the model once, then per image reads the bytes,
decodes them with the consumers' bounded decoder (`trainer.imaging.decode_image`, so a bad image gets
the dead-letter reason the service would give), scores with `LocalInspector` (the maps of the Serve
path, `workers.inspection`) and writes the ``.npz`` map and JPEG overlay. The driver streams the
actors' rows back (``iter_batches``), shows progress, and writes them to Parquet manifest parts
(`workers.rescore_manifest`) every ``flush_rows`` rows or ``flush_s`` seconds and when the run ends,
so an interrupted run keeps what it finished. A bad image is a manifest row, never an aborted run.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import DeadReason, Settings
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from workers.archive import ArchiveImage, ArchiveSource, manifest_name
from workers.inspection import default_sizes
from workers.overlay import OVERLAY_SUFFIX
from workers.rescore_actor import STORE_RETRY_S, ImageRescorer
from workers.rescore_manifest import (
    OverlayPolicy,
    RowStatus,
    bad_row,
    check_version,
    manifest_prefix,
    map_stem,
    part_key,
    progress_line,
    rows_table,
    source_tag,
)
from workers.retry import retry_call

MAX_BLOCKS = 2000
"""At most this many Ray Data blocks (one image each below it): bounds the driver's object refs."""


@dataclass(frozen=True)
class RescoreOptions:
    """How a run is spread over Ray: ``concurrency`` scoring actors (None: as many as the free CPUs
    allow at ``cpus_per_actor``), each with ``torch_threads`` (None: ``cpus_per_actor``, at least 1)."""

    concurrency: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    torch_threads: int | None = None
    forward_patches: int | None = None
    """Patches per forward pass; ``None``: the Serve app's for the actors' device (`forward_size`)."""
    overlays: OverlayPolicy = OverlayPolicy.ANOMALOUS
    """Which images get a JPEG overlay besides their map (default: those at or above the image threshold)."""
    batch_images: int = 1
    max_file_bytes: int = 256 * 1024 * 1024
    flush_rows: int = 500
    flush_s: float = 60.0

    @property
    def forward_size(self) -> int:
        """``forward_patches``, else ``GPU_FORWARD_PATCHES`` for actors with a GPU and ``CPU_FORWARD_PATCHES``
        for the rest (on a GPU the model is launch-bound: on an H200 passes of 512 patches ran it at 45 % of
        its rate in passes of 2048)."""
        if self.forward_patches is not None:
            return self.forward_patches
        return default_sizes(on_gpu=self.gpus_per_actor > 0)[1]


class RescoreProgress(NamedTuple):
    """Where a run stands: images ``done`` (ok + bad + errors) of ``total`` to score."""

    done: int
    total: int
    bad: int
    errors: int
    elapsed_s: float

    def line(self) -> str:
        """``'120/500 images (24 %), 1.20 images/s, ETA 5 min 17 s, 3 bad'``."""
        return progress_line(self.done, self.total, self.bad, self.elapsed_s)


@dataclass
class RescoreSummary:
    """What a run did. ``errors``: images whose maps could not be stored (not in the manifest; a re-run retries)."""

    source: str
    model_version: str
    run_id: str
    listed: int = 0
    skipped: int = 0
    scored: int = 0
    bad: int = 0
    errors: int = 0
    seconds: float = 0.0
    concurrency: int = 0
    manifest_parts: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    """Local folders that could not be listed (``"<path>: <error>"``): their images are not in this run."""

    @property
    def images_per_s(self) -> float:
        """Images scored or rejected per second of the run (listing included)."""
        return (self.scored + self.bad) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """For JSON."""
        return {**asdict(self), "images_per_s": round(self.images_per_s, 4)}


def scored_images(store: ObjectStore, version: str) -> set[str]:
    """The ``image`` of every row in the manifest parts of ``version`` (ok or bad)."""
    done: set[str] = set()
    for key in store.list_keys(manifest_prefix(version)):
        if key.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(store.get_bytes(key)), columns=["image"])
            done.update(table.column("image").to_pylist())
    return done


class ManifestWriter:
    """Buffers manifest rows (ok and bad; error rows are dropped) and writes them as Parquet parts."""

    def __init__(self, store: ObjectStore, version: str, run_id: str, flush_rows: int, flush_s: float) -> None:
        self.store, self.version, self.run_id = store, version, run_id
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.parts: list[str] = []
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
        """Write the buffered rows as the next part (nothing if none)."""
        if self._rows:
            buffer = io.BytesIO()
            pq.write_table(pa.concat_tables(self._tables), buffer, compression="zstd")
            key, data = part_key(self.version, self.run_id, len(self.parts)), buffer.getvalue()
            retry_call(  # a blip of the store must not end a long run
                lambda: self.store.put_bytes(key, data, "application/vnd.apache.parquet"),
                transient=(Exception,),
                limit_s=STORE_RETRY_S,
                abort=threading.Event(),
                what=f"writing {key}",
            )
            self.parts.append(key)
            self._tables, self._rows = [], 0
        self._last = time.monotonic()


def default_concurrency(options: RescoreOptions) -> int:
    """``options.concurrency``, else as many actors as the cluster's free CPUs (and GPUs) hold (>= 1)."""
    if options.concurrency is not None:
        return options.concurrency
    import ray

    free = ray.available_resources()
    fits = int(free.get("CPU", 1.0) // options.cpus_per_actor) if options.cpus_per_actor > 0 else 1
    if options.gpus_per_actor > 0:
        fits = min(fits, int(free.get("GPU", 0.0) // options.gpus_per_actor))
    return max(1, fits)


def plan_items(
    images: list[ArchiveImage], version: str, tag: str, run_id: str, max_file_bytes: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``images`` into Ray Data items (`ArchiveImage` fields + ``map_key``, ``overlay_key``) and
    manifest rows of those rejected before reading: too many bytes, or an unsafe relative path."""
    items: list[dict[str, Any]] = []
    early: list[dict[str, Any]] = []
    for image in images:
        now = datetime.now(UTC)
        if manifest_name(image.image) != image.image:  # a local name that is not UTF-8: no manifest can hold it
            name, relative = manifest_name(image.image), manifest_name(image.relative)
            detail = f"the file name '{relative}' is not valid UTF-8 (shown with \\x escapes); rename it to score it"
            early.append(bad_row(name, relative, DeadReason.INVALID_ENTRY, detail, version, run_id, now))
            continue
        if image.size > max_file_bytes:
            detail = f"{image.size} bytes; at most {max_file_bytes} are allowed"
            early.append(
                bad_row(image.image, image.relative, DeadReason.PAYLOAD_TOO_LARGE, detail, version, run_id, now)
            )
            continue
        try:
            stem = map_stem(version, tag, image.relative)
        except ValueError as exc:
            early.append(bad_row(image.image, image.relative, DeadReason.INVALID_ENTRY, str(exc), version, run_id, now))
            continue
        items.append({**asdict(image), "map_key": f"{stem}.npz", "overlay_key": f"{stem}{OVERLAY_SUFFIX}"})
    return items, early


def rescore(
    settings: Settings,
    source: str,
    version: str,
    options: RescoreOptions | None = None,
    progress: Callable[[RescoreProgress], None] | None = None,
) -> RescoreSummary:
    """Score every image of ``source`` not yet in ``version``'s manifest; Ray must be connected.

    Raises `workers.archive.SourceError` for a bad source, `trainer.registry.ModelNotFound` for an unknown
    version, ValueError for an invalid one.
    """
    import ray.data

    options = options or RescoreOptions()
    started = time.monotonic()
    check_version(version)
    store = ObjectStore.from_settings(settings)
    ModelRegistry(store, settings.model_name).load_card(version)  # fail here, not in every actor
    archive = ArchiveSource.parse(source)
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    summary = RescoreSummary(archive.uri, version, run_id)
    images = archive.list_images(store, summary.unreadable)
    done = scored_images(store, version)
    todo = [image for image in images if manifest_name(image.image) not in done]
    summary.listed, summary.skipped = len(images), len(images) - len(todo)
    writer = ManifestWriter(store, version, run_id, options.flush_rows, options.flush_s)
    items, early = plan_items(todo, version, source_tag(archive.uri), run_id, options.max_file_bytes)
    summary.bad = len(early)
    if early:
        writer.add(rows_table(early))

    def report() -> None:
        if progress is not None:
            done_now = summary.scored + summary.bad + summary.errors
            progress(RescoreProgress(done_now, len(todo), summary.bad, summary.errors, time.monotonic() - started))

    report()
    try:
        if items:
            summary.concurrency = default_concurrency(options)
            threads = options.torch_threads or max(1, int(options.cpus_per_actor))
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # ours (``progress``) says the same in one line
            context.print_on_execution_start = False
            dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS)).map_batches(
                ImageRescorer,
                fn_constructor_args=(
                    settings,
                    version,
                    archive,
                    run_id,
                    threads,
                    options.forward_size,
                    options.overlays,
                ),
                batch_size=options.batch_images,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=summary.concurrency),
                num_cpus=options.cpus_per_actor,
                num_gpus=options.gpus_per_actor or None,
            )
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                statuses = table.column("status").to_pylist()
                summary.scored += statuses.count(str(RowStatus.OK))
                summary.bad += statuses.count(str(RowStatus.BAD))
                summary.errors += statuses.count(str(RowStatus.ERROR))
                writer.add(table)
                report()
    finally:  # an interrupted run keeps the rows it has: the next run skips those images
        writer.flush()
        summary.manifest_parts = writer.parts
        summary.seconds = time.monotonic() - started
    return summary
