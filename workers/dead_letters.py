"""Listing dead letters and re-driving them once their cause is fixed.

    for dead_id, letter in dead_letters(client, names):               # oldest first, paged
        ...
    chosen = [(i, l) for i, l in dead_letters(client, names) if matches(l, reasons={"missing_object"})]
    outcome, new_id = redrive(client, names, dead_id, letter)          # Redrive.REDRIVEN, "1796...-0"

A dead letter names its original entry (``stream``, ``entry_id``), which stays in its job stream (or
in ``anomap:confirmations``) until the stream's cap trims it (`workers.publisher.PUBLISH_JOB`). A
re-drive adds the original's fields again as a new entry of the same stream and deletes the dead
letter, in one Lua script (`REDRIVE_DEAD_LETTER`), so an interrupted or repeated re-drive sends each
job once. A ``duplicate_job`` is never re-driven: its job id has a result already.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterator
from enum import StrEnum

import redis
from pydantic import ValidationError

from schemas import DeadLetter, DeadReason, StreamNames
from schemas.ids import LINE_PATTERN
from workers.publisher import DEFAULT_JOBS_MAXLEN
from workers.stream_scripts import REDRIVE_DEAD_LETTER

log = logging.getLogger(__name__)

PAGE = 500
"""Dead letters read per XRANGE call."""
NOT_REDRIVEN = frozenset({DeadReason.DUPLICATE_JOB})
"""Reasons whose entries must not be sent again: the job id already has a result."""


class Redrive(StrEnum):
    """What a re-drive did with one dead letter."""

    REDRIVEN = "redriven"
    """The original entry was added again as a new entry; the dead letter is gone."""
    TRIMMED = "trimmed"
    """The original entry is no longer in its stream: the job must be published again; the dead letter stays."""
    GONE = "gone"
    """The dead letter was no longer there (another re-drive took it, or the dead-letter stream's cap)."""
    FULL = "full"
    """The stream holds its cap (`DEFAULT_JOBS_MAXLEN`) already: nothing added; the dead letter stays."""
    REFUSED = "refused"
    """Not re-driven: a ``duplicate_job``, or a stream that is not a job or confirmation stream of this prefix."""


def dead_letters(
    client: redis.Redis, names: StreamNames, page: int = PAGE, unreadable: list[str] | None = None
) -> Iterator[tuple[str, DeadLetter]]:
    """(dead entry id, letter) of the dead-letter stream, oldest first, read ``page`` at a time. An entry that is
    not a `DeadLetter` (another writer's, another version's) is skipped; its id and why go to ``unreadable``."""
    start = "-"
    while True:
        entries = client.xrange(names.dead, min=start, count=page)
        for raw_id, fields in entries:
            dead_id = raw_id.decode()
            try:
                yield dead_id, DeadLetter.model_validate_json(fields.get(b"dead", b""))
            except ValidationError as exc:
                if unreadable is not None:
                    unreadable.append(f"{dead_id}: {exc.errors()[0]['msg']}")
        if len(entries) < page:
            return
        start = "(" + entries[-1][0].decode()


def matches(
    letter: DeadLetter,
    reasons: Collection[str] = (),
    lines: Collection[str] = (),
    job_ids: Collection[str] = (),
) -> bool:
    """Whether ``letter`` has one of ``reasons``, is of one of ``lines`` and has one of ``job_ids`` (an empty
    collection matches everything). A dead letter without a line counts as the ``default`` line's."""
    return (
        (not reasons or letter.reason.value in reasons)
        and (not lines or (letter.line or "default") in lines)
        and (not job_ids or letter.job_id in job_ids)
    )


def redrivable_stream(names: StreamNames, stream: str) -> bool:
    """Whether ``stream`` is one a dead letter may be re-driven to: a job stream or the confirmations of
    ``names``' prefix (a letter's ``stream`` is data; it never names an arbitrary key to write)."""
    if stream in (names.jobs(), names.confirmations):
        return True
    line_stream = re.fullmatch(re.escape(names.jobs()) + r":(.+)", stream)
    return line_stream is not None and re.fullmatch(LINE_PATTERN, line_stream.group(1)) is not None


def redrive(
    client: redis.Redis, names: StreamNames, dead_id: str, letter: DeadLetter, maxlen: int = DEFAULT_JOBS_MAXLEN
) -> tuple[Redrive, str | None]:
    """Send a dead letter's original entry again as a new entry and delete the dead letter, in one step;
    (outcome, the new entry's id when re-driven). A stream that holds ``maxlen`` entries takes none (`FULL`),
    as `workers.publisher.publish_job` would refuse a camera's job."""
    if letter.reason in NOT_REDRIVEN or not redrivable_stream(names, letter.stream):
        return Redrive.REFUSED, None
    script = client.register_script(REDRIVE_DEAD_LETTER)
    reply = script(keys=[names.dead, letter.stream], args=[dead_id, letter.entry_id, maxlen])
    outcome = Redrive(reply[0].decode())
    new_id = reply[1].decode() if outcome is Redrive.REDRIVEN else None
    log.info("dead letter %s (job %s, %s): %s %s", dead_id, letter.job_id, letter.reason.value, outcome.value, new_id)
    return outcome, new_id
