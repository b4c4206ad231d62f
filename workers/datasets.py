"""Confirmed images in the object store, ready for retraining: where they go and how they are made.

    datasets/<line>/abnormal/<job_id>.png        the job's image as the model saw it (lossless PNG)
    datasets/<line>/abnormal/<job_id>_mask.png   0/255 mask of the defect, when boxes or a mask were given
    datasets/<line>/normal/<job_id>.png          a false alarm: joins the normal training data

`file_confirmation` writes one `Confirmation` there, idempotently: an object that already holds the
same bytes is not written again, and the latest label wins (a job confirmed normal, then abnormal,
ends up under ``abnormal/`` only). The mask is written before the image, so an image never appears
without the mask it was confirmed with.

Where the job's image comes from (`find_job_image`), in this order:

1. ``images/<line>/scored/<job_id>``, the image bytes the consumer kept when it scored the job
   (`workers.scored_images`);
2. else the job's own stream entry, found through the job's done marker (which holds its entry id):
   its inline bytes, or the object its ``image_ref`` names.

Either is decoded by the consumer's bounded decoder and filed as a lossless PNG (`scored_png`). No
object (kept image, ``image_ref``, ``mask_ref``) is read past ``MAX_REFERENCED_IMAGE_BYTES``, the
consumer's limit: a larger one is refused (``payload_too_large``) before it is read whole.

A 128×128 image confirmed abnormal with ``boxes=[Box(x=120, y=0, width=20, height=4)]`` gets a mask
with rows 0-3, columns 120-127 set: boxes are clipped to the image, and one wholly outside it is an error.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import redis
from PIL import Image

from schemas import Box, Confirmation, ConfirmationLabel, DeadReason, JobRejected, StreamNames, parse_s3_ref
from schemas.stream import MAX_REFERENCED_IMAGE_BYTES, decode_job_entry, parse_entry_marker
from trainer.imaging import ImageRejected, decode_image, encode_png
from trainer.store import ObjectForbidden, ObjectMissing, ObjectStore, ObjectTooLarge
from workers.retrain_data import MASK_SUFFIX
from workers.scored_images import scored_image_key, scored_png


class ConfirmationRejected(Exception):
    """A confirmation that cannot be filed; carries the dead-letter reason and what was wrong."""

    def __init__(self, reason: DeadReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def dataset_image_key(line: str, label: ConfirmationLabel, job_id: str) -> str:
    """``datasets/<line>/<label>/<job_id>.png``."""
    return f"datasets/{line}/{label.value}/{job_id}.png"


def dataset_mask_key(line: str, job_id: str) -> str:
    """``datasets/<line>/abnormal/<job_id>_mask.png``."""
    return f"datasets/{line}/{ConfirmationLabel.ABNORMAL.value}/{job_id}{MASK_SUFFIX}.png"


def find_job_image(client: redis.Redis, store: ObjectStore, names: StreamNames, job_id: str, line: str) -> bytes:
    """The PNG of the image the model scored for ``job_id`` on ``line`` (see the module docstring).

    Raises `ConfirmationRejected`: ``unknown_job`` when neither source has it, ``missing_object`` when
    the job's ``image_ref`` is gone, ``forbidden_object`` when it may not be read
    (`ObjectStore.read_reference`), ``payload_too_large`` when the object is over
    ``MAX_REFERENCED_IMAGE_BYTES``, or the image's own reason when its bytes do not decode.
    """
    kept = scored_image_key(line, job_id)
    try:
        return _as_png(job_id, store.get_bytes(kept, max_bytes=MAX_REFERENCED_IMAGE_BYTES))
    except ObjectMissing:
        pass
    except ObjectTooLarge as exc:
        raise ConfirmationRejected(DeadReason.PAYLOAD_TOO_LARGE, f"job {job_id!r}: its kept image {exc}") from exc
    marker = client.get(names.done_marker(job_id))
    where = f"no kept image {store.ref(kept)}"
    if marker is None:
        msg = f"job {job_id!r} on line {line!r}: {where} and no result marker; was it scored, and on this line?"
        raise ConfirmationRejected(DeadReason.UNKNOWN_JOB, msg)
    stream = names.jobs(line)
    marked_stream, eid = parse_entry_marker(marker.decode(errors="replace"))
    if marked_stream not in (stream, None):
        msg = f"job {job_id!r} on line {line!r}: {where}, and its result came from {marked_stream}, not {stream}"
        raise ConfirmationRejected(DeadReason.UNKNOWN_JOB, msg)
    items = client.xrange(stream, min=eid, max=eid, count=1)
    try:
        job, inline = decode_job_entry(items[0][1]) if items else (None, None)
    except JobRejected as exc:
        raise ConfirmationRejected(exc.reason, f"job {job_id!r}: its entry {eid} on {stream}: {exc.detail}") from exc
    if job is None or job.job_id != job_id:
        msg = f"job {job_id!r} on line {line!r}: {where}, and entry {eid} is not on {stream} (trimmed, or another line)"
        raise ConfirmationRejected(DeadReason.UNKNOWN_JOB, msg)
    if inline is None:
        assert job.image_ref is not None  # decode_job_entry guarantees one of them
        ref = parse_s3_ref(job.image_ref)
        try:
            inline = store.read_reference(ref, max_bytes=MAX_REFERENCED_IMAGE_BYTES)
        except ObjectMissing as exc:
            msg = f"job {job_id!r}: its image {job.image_ref} no longer exists"
            raise ConfirmationRejected(DeadReason.MISSING_OBJECT, msg) from exc
        except ObjectForbidden as exc:
            raise ConfirmationRejected(DeadReason.FORBIDDEN_OBJECT, f"job {job_id!r}: its image: {exc}") from exc
        except ObjectTooLarge as exc:
            raise ConfirmationRejected(DeadReason.PAYLOAD_TOO_LARGE, f"job {job_id!r}: its image {exc}") from exc
    return _as_png(job_id, inline)


def _as_png(job_id: str, payload: bytes) -> bytes:
    """A job's image bytes as the lossless PNG of what the model saw."""
    try:
        return scored_png(decode_image(payload))
    except ImageRejected as exc:
        raise ConfirmationRejected(exc.reason, f"job {job_id!r}: {exc.detail}") from exc


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of PNG bytes, read from the header."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def box_mask(boxes: list[Box], width: int, height: int) -> np.ndarray:
    """An (height, width) bool mask with every box filled, clipped to the image."""
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        if box.x >= width or box.y >= height:
            msg = f"box x={box.x},y={box.y},w={box.width},h={box.height} lies outside the {width}×{height} image"
            raise ConfirmationRejected(DeadReason.BOX_OUTSIDE_IMAGE, msg)
        mask[box.y : box.y + box.height, box.x : box.x + box.width] = True
    return mask


def referenced_mask(store: ObjectStore, mask_ref: str, width: int, height: int) -> np.ndarray:
    """The mask at ``mask_ref`` as an (height, width) bool array (any non-black pixel is marked).

    An object over ``MAX_REFERENCED_IMAGE_BYTES`` is refused (``payload_too_large``) unread, and so is one
    in a bucket references may not name (``forbidden_object``, `ObjectStore.read_reference`).
    """
    ref = parse_s3_ref(mask_ref)
    try:
        data = store.read_reference(ref, max_bytes=MAX_REFERENCED_IMAGE_BYTES)
    except ObjectMissing as exc:
        raise ConfirmationRejected(DeadReason.MISSING_OBJECT, f"mask {mask_ref} does not exist") from exc
    except ObjectForbidden as exc:
        raise ConfirmationRejected(DeadReason.FORBIDDEN_OBJECT, f"mask: {exc}") from exc
    except ObjectTooLarge as exc:
        raise ConfirmationRejected(DeadReason.PAYLOAD_TOO_LARGE, f"mask {exc}") from exc
    try:
        mask = decode_image(data) > 0
    except ImageRejected as exc:
        raise ConfirmationRejected(exc.reason, f"mask {mask_ref}: {exc.detail}") from exc
    if mask.shape != (height, width):
        msg = f"mask {mask_ref} is {mask.shape[1]}×{mask.shape[0]}; the job's image is {width}×{height}"
        raise ConfirmationRejected(DeadReason.MASK_SIZE_MISMATCH, msg)
    return mask


def confirmation_mask(store: ObjectStore, confirmation: Confirmation, width: int, height: int) -> np.ndarray | None:
    """The union of the confirmation's boxes and mask; None when it gives neither."""
    if not confirmation.boxes and confirmation.mask_ref is None:
        return None
    mask = box_mask(confirmation.boxes, width, height)
    if confirmation.mask_ref is not None:
        mask |= referenced_mask(store, confirmation.mask_ref, width, height)
    if not mask.any():
        raise ConfirmationRejected(DeadReason.EMPTY_MASK, f"the mask of job {confirmation.job_id!r} marks no pixel")
    return mask


@dataclass
class FiledConfirmation:
    """What `file_confirmation` did: objects written, removed, and already in place."""

    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether anything in the store changed."""
        return bool(self.written or self.removed)


def _put_if_different(store: ObjectStore, key: str, data: bytes, filed: FiledConfirmation) -> None:
    try:
        same = store.get_bytes(key, max_bytes=len(data)) == data  # a larger object differs: not read whole
    except (ObjectMissing, ObjectTooLarge):
        same = False
    if same:
        filed.unchanged.append(key)
    else:
        store.put_bytes(key, data, "image/png")
        filed.written.append(key)


def file_confirmation(
    client: redis.Redis, store: ObjectStore, names: StreamNames, confirmation: Confirmation
) -> FiledConfirmation:
    """Copy the confirmed job's image (and mask) into ``datasets/<line>/<label>/``; remove a stale copy.

    Raises `ConfirmationRejected` for a confirmation that can never be filed (its reason says why);
    any other error (the store or Redis away) leaves things to be tried again.
    """
    job_id, line = confirmation.job_id, confirmation.line
    if job_id.endswith(MASK_SUFFIX):  # datasets/<line>/abnormal/<job>_mask.png is the mask of <job>
        owner = job_id[: -len(MASK_SUFFIX)]
        detail = f"job ids ending in {MASK_SUFFIX!r} cannot be filed: the name is taken by the mask of job {owner!r}"
        raise ConfirmationRejected(DeadReason.INVALID_SCHEMA, detail)
    image = find_job_image(client, store, names, job_id, line)
    width, height = png_size(image)
    mask_key = dataset_mask_key(line, job_id)
    filed = FiledConfirmation()
    stale: list[str] = []
    if confirmation.label is ConfirmationLabel.ABNORMAL:
        mask = confirmation_mask(store, confirmation, width, height)
        if mask is None:
            stale.append(mask_key)
        else:
            _put_if_different(store, mask_key, encode_png(mask), filed)
        stale.append(dataset_image_key(line, ConfirmationLabel.NORMAL, job_id))
    else:
        stale += [dataset_image_key(line, ConfirmationLabel.ABNORMAL, job_id), mask_key]
    _put_if_different(store, dataset_image_key(line, confirmation.label, job_id), image, filed)
    for key in stale:
        if store.exists(key):
            store.delete(key)
            filed.removed.append(key)
    return filed
