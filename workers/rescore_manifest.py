"""Archive re-scoring, the pure part: object keys, manifest rows and their Parquet schema (no I/O).

Everything a re-scoring run writes lives under one prefix per model version, in the settings' bucket::

    rescore/<version>/maps/<source>/<relative path>.npz      float16 (H, W) map, array "map" (`encode_map`)
    rescore/<version>/maps/<source>/<relative path>.jpg      RGB overlay for people (JPEG)
    rescore/<version>/manifest/part-<run>-<seq>.parquet      one row per image (`MANIFEST_SCHEMA`)
    rescore/<version>/locks/<source>.json                    the run scoring that source now (`RunMarker`)

``<source>`` tells archives apart (``lot7-3f9c2a1b``: the source's last name and a digest of its
URI), so two folders that both hold ``a.png`` never share a map. The relative path keeps its suffix
(``a.png`` and ``a.jpg`` are two images) and is made of safe key segments only::

    >>> map_stem("v1", "lot7-3f9c2a1b", "day 1/img.png")      # unsafe characters: replaced, + digest
    'rescore/v1/maps/lot7-3f9c2a1b/day_1/img.png-becd0962'
    >>> safe_relative("../etc/passwd")
    Traceback (most recent call last):
    ValueError: unsafe relative path '../etc/passwd': segment '..' (no empty, '.' or '..' segments)

A manifest row's ``status`` is ``ok`` (scored: scores, regions and map keys set) or ``bad`` (the image
cannot be scored: ``reason`` is the dead-letter reason code the service would give, ``detail`` what
was wrong). Rows a scoring actor returns as ``error`` (the object store stayed away) are not written,
so a re-run scores those images again.

One run at a time scores a (version, source): it holds the source's marker object, which names it and
is rewritten every `LOCK_HEARTBEAT_S`; a marker older than the run's ``stale_s`` belongs to a run that
died and may be taken over (`lock_state`). Should two runs still have scored an image (a forced take-over,
or parts from before the marker existed), readers keep its latest row (`latest_rows`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas import DeadReason, Region
from schemas.ids import MODEL_VERSION_PATTERN
from trainer.progress import format_eta
from workers.inspection import ScoredImage

RESCORE_PREFIX = "rescore"
LOCK_HEARTBEAT_S = 30.0
"""How often a run rewrites its marker object."""
LOCK_STALE_S = 300.0
"""A marker not rewritten for this long belongs to a run that died: the next run takes it over."""
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]{0,200}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.=-]")
MAX_RELATIVE_LENGTH = 800
"""Longest relative path (characters) that still leaves room for the prefix in a 1024-byte key."""


class OverlayPolicy(StrEnum):
    """Which images get an overlay: in an archive most images are normal and nobody looks at theirs."""

    ALL = "all"
    ANOMALOUS = "anomalous"
    """Only images whose image score reaches the threshold (``is_anomalous``): the ones a person opens."""
    NONE = "none"

    def wants(self, is_anomalous: bool) -> bool:
        """Whether an image with this verdict gets an overlay."""
        return self is OverlayPolicy.ALL or (self is OverlayPolicy.ANOMALOUS and is_anomalous)


class RowStatus(StrEnum):
    """What became of one image. ``ERROR`` rows never reach the manifest (the image is tried again)."""

    OK = "ok"
    BAD = "bad"
    ERROR = "error"


REGION_TYPE = pa.struct(
    [
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("area", pa.int64()),
        ("peak_score", pa.float64()),
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image", pa.string(), nullable=False),  # s3://bucket/key or an absolute local path
        pa.field("relative_path", pa.string(), nullable=False),  # below the source, as listed
        pa.field("status", pa.string(), nullable=False),  # RowStatus: ok | bad
        pa.field("reason", pa.string()),  # DeadReason value when bad, else null
        pa.field("detail", pa.string()),  # what was wrong, when bad
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_score", pa.float64()),  # normalised: 1.0 = the card's image threshold
        pa.field("raw_image_score", pa.float64()),  # max of the map, raw units
        pa.field("is_anomalous", pa.bool_()),
        pa.field("pixel_threshold", pa.float64()),
        pa.field("regions", pa.list_(REGION_TYPE)),  # strongest first, at most MAX_REGIONS
        pa.field("regions_truncated", pa.bool_()),
        pa.field("map_key", pa.string()),  # key of the .npz in the settings' bucket
        pa.field("overlay_key", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def check_version(version: str) -> str:
    """``version`` if it is a valid model version id (it becomes part of every key), else ValueError."""
    if not re.fullmatch(MODEL_VERSION_PATTERN, version):
        msg = f"invalid model version {version[:80]!r}; expected letters, digits, '_' and '-'"
        raise ValueError(msg)
    return version


def version_prefix(version: str) -> str:
    """``rescore/<version>/``."""
    return f"{RESCORE_PREFIX}/{check_version(version)}/"


def manifest_prefix(version: str) -> str:
    """Where the manifest parts of ``version`` live: ``rescore/<version>/manifest/``."""
    return f"{version_prefix(version)}manifest/"


def part_key(version: str, run_id: str, seq: int) -> str:
    """The key of one manifest part: ``rescore/<version>/manifest/part-<run_id>-<seq:05d>.parquet``."""
    return f"{manifest_prefix(version)}part-{run_id}-{seq:05d}.parquet"


def lock_key(version: str, tag: str) -> str:
    """The marker object of the run scoring source ``tag`` with ``version``: ``rescore/<version>/locks/<tag>.json``."""
    if not _SAFE_SEGMENT.fullmatch(tag):
        msg = f"invalid source tag {tag!r}"
        raise ValueError(msg)
    return f"{version_prefix(version)}locks/{tag}.json"


@dataclass(frozen=True)
class RunMarker:
    """Who is scoring a (version, source) now: the content of its marker object (JSON)."""

    run_id: str
    source: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime

    def to_json(self) -> bytes:
        """The marker object's bytes."""
        fields = asdict(self) | {
            "started_at": self.started_at.isoformat(),
            "heartbeat_at": self.heartbeat_at.isoformat(),
        }
        return json.dumps(fields).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunMarker:
        """Parse a marker object; ValueError when it is not one."""
        try:
            fields = json.loads(data)
            marker = cls(
                run_id=str(fields["run_id"]),
                source=str(fields["source"]),
                host=str(fields["host"]),
                pid=int(fields["pid"]),
                started_at=datetime.fromisoformat(fields["started_at"]),
                heartbeat_at=datetime.fromisoformat(fields["heartbeat_at"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            msg = f"not a rescore run marker: {data[:120]!r}"
            raise ValueError(msg) from exc
        if marker.heartbeat_at.tzinfo is None or marker.started_at.tzinfo is None:
            msg = f"a rescore run marker without time zones: {data[:120]!r}"
            raise ValueError(msg)
        return marker

    def beat(self, at: datetime) -> RunMarker:
        """The marker with its heartbeat at ``at``."""
        return replace(self, heartbeat_at=at)

    def age_s(self, now: datetime) -> float:
        """Seconds since its last heartbeat (negative if its host's clock is ahead)."""
        return (now - self.heartbeat_at).total_seconds()

    def describe(self, now: datetime) -> str:
        """``'run 20261130T101500-3f9c2a on host-a (pid 4242), started 2026-11-30 10:15:00+0000, last heartbeat
        12 s ago'``."""
        return (
            f"run {self.run_id} on {self.host} (pid {self.pid}), started {self.started_at:%Y-%m-%d %H:%M:%S%z}, "
            f"last heartbeat {self.age_s(now):.0f} s ago"
        )


class LockState(StrEnum):
    """What a run finds at its source's marker key."""

    FREE = "free"
    """No marker: take it."""
    STALE = "stale"
    """A marker not rewritten for ``stale_s`` (its run died), unreadable, or ``force``: take it over."""
    HELD = "held"
    """Another live run: refuse."""


def lock_state(marker: RunMarker | None, exists: bool, now: datetime, stale_s: float, force: bool) -> LockState:
    """Whether a run may take the marker key: ``marker`` is what it holds (None: nothing readable), ``exists``
    whether there is an object at all."""
    if not exists:
        return LockState.FREE
    if force or marker is None or marker.age_s(now) >= stale_s:
        return LockState.STALE
    return LockState.HELD


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per ``image`` of a manifest table: the one with the latest ``scored_at`` (of equal ones, the
    later row). Two runs that scored the same image left two rows; history is counted once."""
    if table.num_rows < 2:
        return table
    order = pa.array(range(table.num_rows), pa.int64())
    ranked = table.append_column("_row", order).sort_by(
        [("image", "ascending"), ("scored_at", "descending"), ("_row", "descending")]
    )
    images = ranked.column("image").combine_chunks()
    first = pc.not_equal(images.slice(1), images.slice(0, len(images) - 1))
    keep = pa.concat_arrays([pa.array([True]), first])
    return ranked.filter(keep).drop_columns(["_row"])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def source_tag(source_uri: str) -> str:
    """A key segment naming an archive: its last path name, made safe, and a digest of the whole URI."""
    name = source_uri.rstrip("/").rsplit("/", 1)[-1]
    slug = _UNSAFE_CHARS.sub("_", name).strip("._")[:40] or "source"
    return f"{slug}-{_digest(source_uri)}"


def safe_relative(relative: str) -> str:
    """``relative`` as safe key segments: unsafe characters become ``_`` (plus a digest of the original,
    so two names never meet). Raises ValueError on an empty, absolute, too long or traversing path."""
    if not relative or relative.startswith("/") or len(relative) > MAX_RELATIVE_LENGTH:
        msg = f"unsafe relative path {relative[:120]!r} (expected 1..{MAX_RELATIVE_LENGTH} chars, not absolute)"
        raise ValueError(msg)
    segments = relative.split("/")
    for segment in segments:
        if segment in {"", ".", ".."}:
            msg = f"unsafe relative path {relative[:120]!r}: segment {segment!r} (no empty, '.' or '..' segments)"
            raise ValueError(msg)
    safe = [_UNSAFE_CHARS.sub("_", s) for s in segments]
    safe = ["_" + s[1:] if s[0] in ".-=" else s for s in safe]  # a key segment starts with [A-Za-z0-9_]
    safe = [s if len(s) <= 180 else f"{s[:170]}-{_digest(s)}" for s in safe]
    if safe != segments:
        safe[-1] = f"{safe[-1]}-{_digest(relative)}"
    if not all(_SAFE_SEGMENT.fullmatch(s) for s in safe):  # cannot happen after the replacements above
        msg = f"unsafe relative path {relative[:120]!r}"
        raise ValueError(msg)
    return "/".join(safe)


def map_stem(version: str, tag: str, relative: str) -> str:
    """``rescore/<version>/maps/<tag>/<safe relative path>``: add ``.npz`` / ``.png`` for the two objects."""
    if not _SAFE_SEGMENT.fullmatch(tag):
        msg = f"invalid source tag {tag!r}"
        raise ValueError(msg)
    return f"{version_prefix(version)}maps/{tag}/{safe_relative(relative)}"


def is_image_name(name: str) -> bool:
    """Whether a file or key name has one of the accepted image suffixes (case-insensitive)."""
    dot = name.rfind(".")
    return dot > name.rfind("/") and name[dot:].lower() in IMAGE_SUFFIXES


def region_dicts(regions: Sequence[Region]) -> list[dict[str, Any]]:
    """Regions as dicts of `REGION_TYPE`'s fields."""
    return [r.model_dump(include={"x", "y", "width", "height", "area", "peak_score"}) for r in regions]


def bad_row(
    image: str,
    relative: str,
    reason: DeadReason,
    detail: str,
    version: str,
    run_id: str,
    at: datetime,
    status: RowStatus = RowStatus.BAD,
) -> dict[str, Any]:
    """A manifest row for an image that was not scored (``status`` ERROR: not kept in the manifest)."""
    return {
        "image": image,
        "relative_path": relative,
        "status": str(status),
        "reason": str(reason),
        "detail": detail[:2000],
        "model_version": version,
        "run_id": run_id,
        "scored_at": at,
    }


def rows_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Manifest rows as a table of `MANIFEST_SCHEMA` (missing fields are null)."""
    return pa.Table.from_pylist(list(rows), schema=MANIFEST_SCHEMA)


def progress_line(done: int, total: int, bad: int, elapsed_s: float) -> str:
    """``'120/500 images (24 %), 1.20 images/s, ETA 5 min 17 s, 3 bad'`` (rate since the run started)."""
    rate = done / elapsed_s if elapsed_s > 0 and done > 0 else 0.0
    speed = f", {rate:.2f} images/s, ETA {format_eta((total - done) / rate)}" if rate > 0 else ""
    return f"{done}/{total} images ({100 * done / max(total, 1):.0f} %){speed}, {bad} bad"


def ok_row(
    image: str,
    relative: str,
    scored: ScoredImage,
    map_key: str,
    overlay_key: str | None,
    run_id: str,
    at: datetime,
) -> dict[str, Any]:
    """The manifest row of a scored image (its (H, W) map stored under ``map_key``; no overlay: None)."""
    summary = scored.summary
    height, width = scored.anomaly_map.shape
    return {
        "image": image,
        "relative_path": relative,
        "status": str(RowStatus.OK),
        "width": width,
        "height": height,
        "image_score": summary.image_score,
        "raw_image_score": summary.raw_image_score,
        "is_anomalous": summary.is_anomalous,
        "pixel_threshold": scored.pixel_threshold,
        "regions": region_dicts(summary.regions),
        "regions_truncated": summary.regions_truncated,
        "map_key": map_key,
        "overlay_key": overlay_key,
        "model_version": scored.model_version,
        "run_id": run_id,
        "scored_at": at,
    }
