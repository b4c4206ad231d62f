"""Archive re-scoring on Ray Data with the service's scorer: ``anomap rescore SOURCE --model VERSION``.

    summary = rescore(settings, "s3://archive/lot7", version, RescoreOptions(concurrency=2), progress=print)
    summary.scored, summary.bad, summary.skipped      # e.g. 48, 2, 0; a second run: 0, 0, 50

The driver takes the source's marker object for the version (`RunLock`: a second run of the same source
and version is refused with `RescoreBusy` naming the first; a marker whose heartbeat stopped
``lock_stale_s`` ago, or ``force``, is taken over), lists the source (`workers.archive`; no images at
all is a `SourceError`), leaves out every image already in a manifest part of that version (ok or bad:
the run is resumable), and makes a Ray Dataset of the rest (``from_items``,
one block per image up to `MAX_BLOCKS`). ``map_batches`` runs `workers.rescore_actor.ImageRescorer`, a
callable class, on ``concurrency`` actors: each loads the model once, then per image reads the bytes,
decodes them with the consumers' bounded decoder (`trainer.imaging.decode_image`, so a bad image gets
the dead-letter reason the service would give), scores with `LocalInspector` (the maps of the Serve
path, `workers.inspection`) and writes the ``.npz`` map and JPEG overlay. The driver streams the
actors' rows back (``iter_batches``), shows progress, and writes them to Parquet manifest parts
(`workers.rescore_manifest`) every ``flush_rows`` rows or ``flush_s`` seconds and when the run ends,
so an interrupted run keeps what it finished. A bad image is a manifest row, never an aborted run.

An image whose actor dies while scoring it (a crash in a decoder, memory) is tried
``1 + ACTOR_TASK_RETRIES`` times, each on a restarted actor, then once more alone on its actor (images
queued behind a killer die with it: alone, each fails only for itself), then comes back as an ``error``
row naming what happened (not recorded: the next run tries it again, as often); the run goes on. A
manifest part that cannot be read, or written past its retries, ends the run with `ManifestError` /
`ManifestWriteError` (`workers.rescore_parts`) naming the object key and what was recorded.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from schemas import DeadReason, Settings
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from workers.archive import (
    ArchiveImage,
    ArchiveSource,
    SourceError,
    manifest_name,
    no_images_message,
)
from workers.inspection import default_sizes
from workers.overlay import OVERLAY_SUFFIX
from workers.rescore_actor import ImageRescorer
from workers.rescore_lock import RescoreBusy, RunLock, run_marker
from workers.rescore_manifest import (
    LOCK_HEARTBEAT_S,
    LOCK_STALE_S,
    OverlayPolicy,
    RowStatus,
    bad_row,
    check_version,
    lock_key,
    map_stem,
    progress_line,
    rows_table,
    source_tag,
)
from workers.rescore_parts import ManifestWriter, scored_images

log = logging.getLogger("anomap.rescore")

MAX_BLOCKS = 2000
"""At most this many Ray Data blocks (one image each below it): bounds the driver's object refs."""
ACTOR_TASK_RETRIES = 2
"""Tries, after the first, of a batch whose scoring actor died (Ray restarts the actor each time); then its
images are error rows. Ray Data's default retries such a batch for ever, so one image that kills its actor
would hold the run for ever."""
MAX_FAILED_SHOWN = 100
"""`RescoreSummary.failed` keeps at most this many ``"<image>: <detail>"`` lines."""


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
    force: bool = False
    """Take over the source's marker even when another run's heartbeat is fresh (that run died, say)."""
    lock_stale_s: float = LOCK_STALE_S
    """A marker whose heartbeat is this old belongs to a run that died: taken over without ``force``."""

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
    failed: list[str] = field(default_factory=list)
    """``"<image>: <detail>"`` of the first `MAX_FAILED_SHOWN` error rows (not recorded; a re-run retries them)."""
    took_over: str | None = None
    """The run whose stale (or, with ``force``, live) marker this run took over, described; None if none."""

    @property
    def images_per_s(self) -> float:
        """Images scored or rejected per second of the run (listing included)."""
        return (self.scored + self.bad) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """For JSON."""
        return {**asdict(self), "images_per_s": round(self.images_per_s, 4)}


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


def lost_rows(items: Sequence[dict[str, Any]], returned: set[str], version: str, run_id: str) -> list[dict[str, Any]]:
    """Error rows for the items whose image came back from no actor (their actor died on every try)."""
    now = datetime.now(UTC)
    detail = (
        f"no result came back: its scoring actor died (or raised) on each of {2 + ACTOR_TASK_RETRIES} tries, "
        "the last alone on its actor (a crash in a decoder, memory?); see the Ray logs"
    )
    return [
        bad_row(
            item["image"], item["relative"], DeadReason.SCORING_FAILED, detail, version, run_id, now, RowStatus.ERROR
        )
        for item in items
        if item["image"] not in returned
    ]


def scored_batches(
    items: list[dict[str, Any]],
    rescorer: type,
    constructor_args: tuple[Any, ...],
    options: RescoreOptions,
    concurrency: int,
    version: str,
    run_id: str,
) -> Iterator[pa.Table]:
    """Run ``rescorer`` (`ImageRescorer`) over ``items`` on ``concurrency`` Ray Data actors; yields their
    `MANIFEST_SCHEMA` tables as they come, then one of error rows for the items no actor answered.

    A batch whose actor died is tried ``1 + ACTOR_TASK_RETRIES`` times (the actor restarted each time), then
    dropped (``max_errored_blocks``, on this dataset only) rather than ending or stalling the run. The batches
    queued on an actor die with it too, so an image that killed its actor can take others down with it:
    the images that no try answered get one more try each, alone on their actor (one batch in flight), and
    only those that fail that one too become error rows.
    """
    returned: set[str] = set()
    for table in _mapped(items, rescorer, constructor_args, options, concurrency, alone=False):
        returned.update(table.column("image").to_pylist())
        yield table
    unanswered = [item for item in items if item["image"] not in returned]
    if unanswered:
        log.warning("%d image(s) got no result; trying each once more, alone on its actor", len(unanswered))
        for table in _mapped(unanswered, rescorer, constructor_args, options, concurrency, alone=True):
            returned.update(table.column("image").to_pylist())
            yield table
    lost = lost_rows(items, returned, version, run_id)
    if lost:
        yield rows_table(lost)


def _mapped(
    items: list[dict[str, Any]],
    rescorer: type,
    constructor_args: tuple[Any, ...],
    options: RescoreOptions,
    concurrency: int,
    alone: bool,
) -> Iterator[pa.Table]:
    """``rescorer`` over ``items`` on a Ray Data actor pool, its tables as they come. ``alone``: one batch in
    flight per actor and no retry (an actor's death then fails only the batch that caused it)."""
    import ray.data

    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    context = dataset.context  # this dataset's own copy of the DataContext
    context.enable_progress_bars = False  # ours (``progress``) says the same in one line
    context.print_on_execution_start = False
    context.max_errored_blocks = -1  # a batch that failed every try: its images become error rows
    pool = ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1 if alone else None)
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for these two yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        mapped = dataset.map_batches(
            rescorer,
            fn_constructor_args=constructor_args,
            batch_size=1 if alone else options.batch_images,
            batch_format="pyarrow",
            compute=pool,
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
            max_restarts=-1,  # a dead actor is replaced (bounded by the task retries: each death costs one)
            max_task_retries=0 if alone else ACTOR_TASK_RETRIES,
        )
    yield from mapped.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)


def rescore(
    settings: Settings,
    source: str,
    version: str,
    options: RescoreOptions | None = None,
    progress: Callable[[RescoreProgress], None] | None = None,
) -> RescoreSummary:
    """Score every image of ``source`` not yet in ``version``'s manifest; Ray must be connected.

    Raises `workers.archive.SourceError` for a bad source or one without images, `RescoreBusy` while another
    run scores the same source with ``version``, `trainer.registry.ModelNotFound` for an unknown version,
    ValueError for an invalid one, `ManifestError` for a manifest part that cannot be read, and
    `ManifestWriteError` when rows could not be recorded.
    """
    options = options or RescoreOptions()
    started = time.monotonic()
    check_version(version)
    store = ObjectStore.from_settings(settings)
    ModelRegistry(store, settings.model_name).load_card(version)  # fail here, not in every actor
    archive = ArchiveSource.parse(source)
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    summary = RescoreSummary(archive.uri, version, run_id)
    tag = source_tag(archive.uri)
    lock = RunLock(
        store,
        lock_key(version, tag),
        run_marker(run_id, archive.uri),
        subject=f"{archive.uri} with {version}",
        stale_s=options.lock_stale_s,
        heartbeat_s=min(LOCK_HEARTBEAT_S, options.lock_stale_s / 10),
    )
    taken = lock.acquire(options.force)
    if taken is not None:
        summary.took_over = taken.describe(datetime.now(UTC))
        log.warning("took over the marker of %s", summary.took_over)
    try:
        return _rescore_locked(settings, archive, version, options, progress, store, summary, lock, started)
    finally:
        lock.release()


def _rescore_locked(
    settings: Settings,
    archive: ArchiveSource,
    version: str,
    options: RescoreOptions,
    progress: Callable[[RescoreProgress], None] | None,
    store: ObjectStore,
    summary: RescoreSummary,
    lock: RunLock,
    started: float,
) -> RescoreSummary:
    """`rescore` while this run holds the source's marker."""
    run_id = summary.run_id
    images = archive.list_images(store, summary.unreadable)
    if not images:
        raise SourceError(no_images_message(archive.uri, summary.unreadable))
    done = scored_images(store, version)
    todo = [image for image in images if manifest_name(image.image) not in done]
    summary.listed, summary.skipped = len(images), len(images) - len(todo)
    writer = ManifestWriter(store, version, run_id, options.flush_rows, options.flush_s)
    items, early = plan_items(todo, version, source_tag(archive.uri), run_id, options.max_file_bytes)
    summary.bad = len(early)

    def report() -> None:
        if progress is not None:
            done_now = summary.scored + summary.bad + summary.errors
            progress(RescoreProgress(done_now, len(todo), summary.bad, summary.errors, time.monotonic() - started))

    try:
        if early:
            writer.add(rows_table(early))
        report()
        if items:
            summary.concurrency = default_concurrency(options)
            threads = options.torch_threads or max(1, int(options.cpus_per_actor))
            args = (settings, version, archive, run_id, threads, options.forward_size, options.overlays)
            for table in scored_batches(items, ImageRescorer, args, options, summary.concurrency, version, run_id):
                _count(summary, table)
                writer.add(table)
                report()
                if lock.lost is not None:
                    msg = (
                        f"another run took over {store.ref(lock.key)} ({lock.lost}); this run stopped, "
                        f"its rows so far are recorded"
                    )
                    raise RescoreBusy(msg)
    finally:  # an interrupted run keeps the rows it has: the next run skips those images
        summary.seconds = time.monotonic() - started
        try:
            writer.flush()  # after a failed write, nothing more is tried (`ManifestWriter.failed`)
        finally:
            summary.manifest_parts = writer.parts
    return summary


def _count(summary: RescoreSummary, table: pa.Table) -> None:
    """Add a batch of rows to ``summary``: ok, bad and error counts, and the first error rows' details."""
    statuses = table.column("status").to_pylist()
    summary.scored += statuses.count(str(RowStatus.OK))
    summary.bad += statuses.count(str(RowStatus.BAD))
    summary.errors += statuses.count(str(RowStatus.ERROR))
    if str(RowStatus.ERROR) in statuses and len(summary.failed) < MAX_FAILED_SHOWN:
        errors = table.filter(pc.equal(table.column("status"), str(RowStatus.ERROR)))
        for image, detail in zip(errors.column("image").to_pylist(), errors.column("detail").to_pylist(), strict=True):
            summary.failed.append(f"{image}: {detail}")
        del summary.failed[MAX_FAILED_SHOWN:]
