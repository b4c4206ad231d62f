"""The scoring actor of archive re-scoring: a Ray Data callable class (`workers.rescore` runs it).

    ImageRescorer(settings, version, source, run_id)(batch)   # batch: a pyarrow table of images to score
    # -> a MANIFEST_SCHEMA table, one row per image: ok (maps stored), bad (reason), or error (retry later)

Per image: read the bytes (`ArchiveSource.read`: a read that no retry fixes — gone, forbidden,
archived, a link loop, not a regular file — is a ``bad`` row naming the S3 code or errno; only
connection-type failures are retried, for `STORE_RETRY_S`; anything else is an ``error`` row at
once), decode them with the consumers' bounded decoder (`decode_image`: a bad image gets the
dead-letter reason the service gives), score with
`LocalInspector` (the Serve path's maps, bit for bit at the same forward batch), then store the
``.npz`` map and (by `OverlayPolicy`: by default for anomalous images only) the JPEG overlay, exactly
as the consumers encode them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pyarrow as pa
import torch

from schemas import DeadReason, Settings
from trainer.imaging import ImageRejected, decode_image
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from workers.archive import ArchiveImage, ArchiveSource, UnreadableImage, is_transient_error
from workers.inspection import LocalInspector
from workers.maps import encode_map
from workers.overlay import OVERLAY_CONTENT_TYPE, overlay_jpeg
from workers.rescore_manifest import OverlayPolicy, RowStatus, bad_row, ok_row, rows_table
from workers.retry import retry_call

T = TypeVar("T")
STORE_RETRY_S = 30.0
"""How long an actor retries a read or write that failed in a way that may pass (the connection, a busy store)
before it gives the image up (error row). Other failures are not retried."""


class StoreAway(Exception):
    """A read or write kept failing in a way that may pass (`is_transient_error`) until its retries ran out;
    ``__cause__`` is the last failure."""


def retry_transient(op: Callable[[], T], what: str, limit_s: float, abort: threading.Event) -> T:
    """``op()``, retried for ``limit_s`` while it fails in a way that may pass (the connection, a busy store);
    raises `StoreAway` when those retries ran out, and any other failure at once (no retry)."""

    def attempt() -> T:
        try:
            return op()
        except Exception as exc:
            if is_transient_error(exc):
                raise StoreAway(exc) from exc
            raise

    return retry_call(attempt, transient=(StoreAway,), limit_s=limit_s, abort=abort, what=what)


def root_cause(exc: BaseException) -> BaseException:
    """The failure itself, unwrapped from `StoreAway`."""
    return exc.__cause__ if isinstance(exc, StoreAway) and exc.__cause__ is not None else exc


class ImageRescorer:
    """Ray Data callable class: loads the model once per actor, then scores batches of archive images.

    A batch is a table of `ArchiveImage` fields plus ``map_key`` / ``overlay_key``; the result is one
    `MANIFEST_SCHEMA` row per image.
    """

    def __init__(
        self,
        settings: Settings,
        version: str,
        source: ArchiveSource,
        run_id: str,
        torch_threads: int = 1,
        forward_patches: int = 128,
        overlays: OverlayPolicy = OverlayPolicy.ANOMALOUS,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.overlays = OverlayPolicy(overlays)
        self.store = ObjectStore.from_settings(settings)
        card, weights = ModelRegistry(self.store, settings.model_name).load(version)
        self.inspector = LocalInspector(PatchModel.from_safetensors(card, weights), forward_patches)
        self.source, self.version, self.run_id = source, version, run_id
        self._abort = threading.Event()

    def _retrying(self, what: str, op: Callable[[], T]) -> T:
        return retry_transient(op, what, STORE_RETRY_S, self._abort)

    def score(self, item: dict[str, Any]) -> dict[str, Any]:
        """Read, decode, score and store one image → its manifest row (status ok, bad or error)."""
        image = ArchiveImage(item["image"], item["relative"], item["size"])

        def bad(reason: DeadReason, detail: str, status: RowStatus = RowStatus.BAD) -> dict[str, Any]:
            now = datetime.now(UTC)
            return bad_row(image.image, image.relative, reason, detail, self.version, self.run_id, now, status)

        try:
            data = self._retrying(f"reading {image.image}", lambda: self.source.read(self.store, image))
        except UnreadableImage as exc:  # gone, forbidden, archived, not a file: a retry will not help
            return bad(DeadReason.MISSING_OBJECT, str(exc))
        except Exception as exc:  # the store stayed away, or an unknown failure: the next run tries again
            return bad(DeadReason.MISSING_OBJECT, f"reading {image.image} failed: {root_cause(exc)!r}", RowStatus.ERROR)
        try:
            pixels = decode_image(data)  # (H, W) float32 in [0, 1]
        except ImageRejected as exc:
            return bad(exc.reason, exc.detail)
        try:
            scored = self.inspector(pixels)
        except Exception as exc:  # the image decoded, so this is the model or the machine (memory): retry next run
            return bad(DeadReason.SCORING_FAILED, f"scoring failed: {exc!r}", RowStatus.ERROR)
        npz = encode_map(scored.anomaly_map)
        overlay_key = item["overlay_key"] if self.overlays.wants(scored.summary.is_anomalous) else None
        try:
            self._retrying(f"writing {item['map_key']}", lambda: self.store.put_bytes(item["map_key"], npz))
            if overlay_key is not None:
                jpeg = overlay_jpeg(pixels, scored.anomaly_map, scored.pixel_threshold)
                self._retrying(
                    f"writing {overlay_key}", lambda: self.store.put_bytes(overlay_key, jpeg, OVERLAY_CONTENT_TYPE)
                )
        except Exception as exc:
            return bad(DeadReason.SCORING_FAILED, f"storing the map failed: {root_cause(exc)!r}", RowStatus.ERROR)
        at = datetime.now(UTC)
        return ok_row(image.image, image.relative, scored, item["map_key"], overlay_key, self.run_id, at)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score every image of ``batch`` → a `MANIFEST_SCHEMA` table, one row per image."""
        return rows_table([self.score(item) for item in batch.to_pylist()])
