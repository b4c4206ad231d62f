"""``anomap confirm`` and ``anomap confirmations ingest``: operators' verdicts, and filing them for retraining.

anomap confirm cam01-7 --abnormal --box 120,40,30,8 --box 10,10,4,4 --by ana   # publish a Confirmation
anomap confirm cam01-7 --abnormal --mask defect.png                          # mask uploaded, by reference
anomap confirm cam01-9 --normal                                              # a false alarm
anomap confirmations ingest --once        # file every waiting confirmation into datasets/<line>/, then exit
anomap confirmations ingest               # ... and keep filing new ones until Ctrl-C

`confirm` only publishes, exactly as a UI or MES would; filing is the job of `confirmations ingest`
(or of the retraining controller, through `workers.confirmations.ingest_confirmations`), so there is
one path from the stream to ``datasets/`` whoever sent the confirmation.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from cluster.cli_common import checked_line, console, err, fail, resolved_settings
from schemas import Box, StreamNames

confirmations_app = typer.Typer(help="Operators' confirmations: file them into datasets/.", no_args_is_help=True)

_BOX = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")


def parse_box(text: str) -> Box:
    """``"x,y,w,h"`` (four non-negative integers, w and h >= 1) as a `Box`; exit 2 otherwise."""
    match = _BOX.match(text)
    if match is None:
        fail(f"--box {text!r} is not x,y,w,h: four non-negative integers, e.g. --box 120,40,30,8")
    x, y, width, height = (int(value) for value in match.groups())
    if width < 1 or height < 1 or width > 65535 or height > 65535:
        fail(f"--box {text!r}: width and height must be between 1 and 65535, got {width} and {height}")
    return Box(x=x, y=y, width=width, height=height)


def _mask_bytes(path: Path) -> bytes:
    """The mask file's bytes, after checking that it is an image that marks at least one pixel."""
    from trainer.imaging import ImageRejected, read_image_file

    try:
        mask = read_image_file(path)
    except ImageRejected as exc:
        fail(f"--mask: {exc.detail}")
    if not (mask > 0).any():
        fail(f"--mask {path} marks no pixel: defects are the non-black pixels of the mask")
    return path.read_bytes()


def confirm(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id, as in its result.")],
    abnormal: Annotated[
        bool, typer.Option("--abnormal/--normal", help="A real defect, or a false alarm (normal).", show_default=False)
    ],
    line: Annotated[str, typer.Option(help="The job's production line.")] = "default",
    mask: Annotated[
        Path | None, typer.Option(help="Defect mask image (non-black = defect), the size of the job's image.")
    ] = None,
    box: Annotated[
        list[str] | None, typer.Option(help="Defect box x,y,w,h in pixels; repeat for several.", show_default=False)
    ] = None,
    by: Annotated[str | None, typer.Option(help="Who confirms (kept with the confirmation).")] = None,
) -> None:
    """Publish an operator's confirmation of a scored job on anomap:confirmations.

    `anomap confirmations ingest` then copies the job's image (and mask) into the object store's
    datasets/<line>/{abnormal,normal}/ for retraining.
    """
    from pydantic import ValidationError

    from schemas import Confirmation, ConfirmationLabel

    checked_line(line)
    boxes = [parse_box(text) for text in box or []]
    if not abnormal and (boxes or mask is not None):
        fail("--box and --mask mark defects: give them with --abnormal, not --normal")
    mask_data = _mask_bytes(mask) if mask is not None else None
    try:
        Confirmation(job_id=job_id, line=line, label=ConfirmationLabel.NORMAL)  # the ids, before any I/O
    except ValidationError as exc:
        fail(f"invalid job id {job_id!r}: {exc.errors()[0]['msg']}")
    settings = resolved_settings(redis=True, s3=mask_data is not None)
    from cluster.connections import object_store, redis_client
    from workers.confirmations import publish_confirmation

    mask_ref = key = store = None
    if mask is not None and mask_data is not None:
        digest = hashlib.sha256(mask_data).hexdigest()[:16]
        key = f"images/{line}/masks/{job_id}-{digest}{mask.suffix.lower()}"
        store = object_store(settings)
        mask_ref = store.ref(key)
    label = ConfirmationLabel.ABNORMAL if abnormal else ConfirmationLabel.NORMAL
    try:  # the whole confirmation, before the mask is uploaded: a refused one leaves no object behind
        confirmation = Confirmation(
            job_id=job_id, line=line, label=label, boxes=boxes, mask_ref=mask_ref, confirmed_by=by
        )
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))
    if store is not None and key is not None and mask_data is not None:
        store.put_bytes(key, mask_data, "image/png" if key.endswith(".png") else "application/octet-stream")
    entry_id = publish_confirmation(redis_client(settings), StreamNames(settings.stream_prefix), confirmation)
    marks = f", {len(boxes)} box(es)" if boxes else ""
    marks += f", mask {mask_ref}" if mask_ref else ""
    console.print(f"confirmed {job_id} {label.value}{marks} (entry {entry_id})", highlight=False)


@confirmations_app.command("ingest")
def ingest_cmd(
    once: Annotated[bool, typer.Option("--once", help="File what is waiting, then exit (else: until Ctrl-C).")] = False,
    consumer: Annotated[str, typer.Option(help="This reader's name in the 'datasets' consumer group.")] = "ingest-1",
) -> None:
    """File confirmations into datasets/<line>/{abnormal,normal}/; bad ones go to anomap:dead with a reason."""
    settings = resolved_settings(redis=True, s3=True)
    from cluster.connections import object_store, redis_client
    from workers.confirmations import Filed, IngestConfig, ingest_confirmations

    stop = None
    if not once:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        console.log("filing confirmations until Ctrl-C")
    counts = ingest_confirmations(
        redis_client(settings),
        object_store(settings),
        StreamNames(settings.stream_prefix),
        IngestConfig(consumer=consumer),
        stop=stop,
    )
    print(json.dumps({outcome.value: n for outcome, n in counts.items()}), flush=True)
    if once and counts.get(Filed.RETRY):  # a cron job must notice: they are filed by the next run
        err.print(
            f"{counts[Filed.RETRY]} confirmations were left pending (the object store or Redis failed); "
            "the next run files them"
        )
        raise typer.Exit(1)
