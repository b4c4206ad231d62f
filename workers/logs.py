"""Log lines about a job carry its id, line and stream entry as record fields; JSON lines on request.

    jlog = job_log(logging.getLogger("anomap.consumer"), "cam01-000042", "default", "1767225600000-0")
    jlog.warning("job %s: scoring failed, left pending", "cam01-000042")

With ``ANOMAP_LOG_FORMAT=text`` (the default) that line reads as it always did; with
``ANOMAP_LOG_FORMAT=json`` `configure_logging` prints one JSON object per line::

    {"ts": "2026-01-01T00:00:00.123+00:00", "level": "WARNING", "logger": "anomap.consumer",
     "message": "job cam01-000042: scoring failed, left pending", "job_id": "cam01-000042",
     "line": "default", "entry_id": "1767225600000-0"}

Job messages name the job in their text too, so text logs and handlers set up by others (Ray's,
pytest's) keep it. Nothing here logs image bytes or connection URLs; callers must not either.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TextIO

LOG_FORMAT_VARIABLE = "ANOMAP_LOG_FORMAT"
JOB_FIELDS = ("job_id", "line", "entry_id")
"""Record attributes that `JsonFormatter` adds to a line when a record carries them."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_HANDLER_MARK = "_anomap_handler"


class LogFormat(StrEnum):
    """How `configure_logging` prints log records."""

    TEXT = "text"
    JSON = "json"


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records carry one job's fields (``extra`` given per call is merged on top)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Add the job's fields to the record's ``extra``."""
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs

    @property
    def fields(self) -> Mapping[str, object]:
        """The job's fields, to hand to code that logs through its own logger (``extra=``)."""
        return self.extra or {}


def job_log(logger: logging.Logger, job_id: str | None, line: str | None, entry_id: str | None = None) -> JobLog:
    """``logger`` with a job's fields on every record; fields that are None are left out."""
    fields = {"job_id": job_id, "line": line, "entry_id": entry_id}
    return JobLog(logger, {key: value for key, value in fields.items() if value is not None})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC), level, logger, message, job fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single JSON line."""
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in JOB_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                document[key] = value
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, ensure_ascii=False)


def log_format(environ: Mapping[str, str] | None = None) -> LogFormat:
    """``ANOMAP_LOG_FORMAT`` from ``environ`` (default: `os.environ`); unset means text."""
    value = (os.environ if environ is None else environ).get(LOG_FORMAT_VARIABLE) or LogFormat.TEXT.value
    try:
        return LogFormat(value.strip().lower())
    except ValueError:
        msg = f"{LOG_FORMAT_VARIABLE} must be one of {[f.value for f in LogFormat]}, got {value!r}"
        raise ValueError(msg) from None


def _formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt is LogFormat.JSON else logging.Formatter(TEXT_FORMAT)


def configure_logging(
    level: int = logging.INFO, *, logger_name: str | None = None, stream: TextIO | None = None
) -> LogFormat:
    """Print log records in the ``ANOMAP_LOG_FORMAT`` format; returns the format.

    For a program (``logger_name`` None): the root logger gets one handler on ``stream`` (stderr)
    unless it has handlers already (`logging.basicConfig`). For a process whose logging belongs to
    someone else (a Serve replica, say): with the JSON format only, the ``logger_name`` logger gets
    its own JSON handler and stops propagating, once; with the text format it is left alone.
    """
    fmt = log_format()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter(fmt))
    setattr(handler, _HANDLER_MARK, True)
    if logger_name is None:
        logging.basicConfig(level=level, handlers=[handler])
        return fmt
    logger = logging.getLogger(logger_name)
    if fmt is LogFormat.JSON and not any(getattr(h, _HANDLER_MARK, False) for h in logger.handlers):
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return fmt
