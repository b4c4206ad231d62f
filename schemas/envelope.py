"""Reading a stream entry's JSON safely: every way it can fail is a `ValueError` that names the problem,
and the ids a dead letter should carry can be read even from an envelope that fails validation.

    >>> parse_json(b'{"job_id": "cam01-1"}')
    {'job_id': 'cam01-1'}
    >>> parse_json(b"[" * 5000)             # json.loads would raise RecursionError here
    Traceback (most recent call last):
    ValueError: JSON nested too deeply (Python's parser gives up near 1000 levels)
    >>> peek_ids({"job_id": "cam\\ud800", "line": "../x"})
    ('cam\\\\ud800', None)
"""

from __future__ import annotations

import json
import re

from schemas.ids import LINE_PATTERN

PEEKED_ID_CHARS = 128
"""The most characters of an id as sent that a dead letter keeps (`DeadLetter.job_id`'s limit)."""


def parse_json(raw: bytes | str) -> object:
    """``raw`` parsed as JSON; a `ValueError` naming the problem when it is not UTF-8, not JSON, or nested so
    deeply that the parser gives up (a `RecursionError` from `json.loads`, which no caller expects)."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        msg = "JSON nested too deeply (Python's parser gives up near 1000 levels)"
        raise ValueError(msg) from exc


def printable(value: str, limit: int = PEEKED_ID_CHARS) -> str:
    """``value`` as it can be shown and stored anywhere: unchanged when printable, else with its control
    characters and lone surrogates escaped (``\\n``, ``\\ud800``); cut to ``limit`` characters."""
    if not value.isprintable():
        value = value.encode("unicode_escape", "backslashreplace").decode("ascii")
    return value[:limit]


def peek_ids(payload: object) -> tuple[str | None, str | None]:
    """The ``job_id`` (made `printable`) and ``line`` (only if it is a valid line id) of a parsed envelope, as
    sent, for a dead letter; None for what is missing or not a string."""
    if not isinstance(payload, dict):
        return None, None
    job_id, line = payload.get("job_id"), payload.get("line")
    return (
        printable(job_id) if isinstance(job_id, str) else None,
        line if isinstance(line, str) and re.fullmatch(LINE_PATTERN, line) else None,
    )


def peek_raw_ids(raw: bytes | None) -> tuple[str | None, str | None]:
    """`peek_ids` of raw envelope bytes; (None, None) when they do not parse."""
    try:
        return peek_ids(parse_json(raw or b""))
    except ValueError:
        return None, None
