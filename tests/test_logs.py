"""Job fields on log records, JSON log lines, and metrics that cost nothing where Ray is not running."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from workers.logs import JsonFormatter, LogFormat, configure_logging, job_log, log_format


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    logger = logging.getLogger("anomap.test-logs")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_json_line_about_a_job_carries_its_id_line_and_entry(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    job_log(logger, "cam01-000042", "line2", "1767225600000-0").warning("job %s: scoring failed", "cam01-000042")
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "job cam01-000042: scoring failed"
    assert (record["job_id"], record["line"], record["entry_id"]) == ("cam01-000042", "line2", "1767225600000-0")
    assert (record["level"], record["logger"]) == ("WARNING", "anomap.test-logs")
    assert record["ts"].endswith("+00:00")


def test_json_line_keeps_the_exception_and_leaves_out_unknown_fields(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        job_log(logger, None, "default", "1-0").exception("entry %s: unexpected error", "1-0")
    record = json.loads(out.getvalue())
    assert "job_id" not in record and record["entry_id"] == "1-0"
    assert "RuntimeError: boom" in record["exc"]


def test_log_format_comes_from_the_environment_and_a_bad_value_is_named() -> None:
    assert log_format({}) is LogFormat.TEXT
    assert log_format({"ANOMAP_LOG_FORMAT": "JSON"}) is LogFormat.JSON
    with pytest.raises(ValueError, match=r"ANOMAP_LOG_FORMAT must be one of.*'yaml'"):
        log_format({"ANOMAP_LOG_FORMAT": "yaml"})


def test_json_handler_for_a_hosted_logger_is_installed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMAP_LOG_FORMAT", "json")
    logger = logging.getLogger("anomap.test-hosted")
    out = io.StringIO()
    try:
        assert configure_logging(logger_name=logger.name, stream=out) is LogFormat.JSON
        configure_logging(logger_name=logger.name, stream=out)
        assert len(logger.handlers) == 1 and not logger.propagate
        job_log(logger, "j1", "default").info("job j1: scored")
        assert json.loads(out.getvalue())["job_id"] == "j1"
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_metrics_without_ray_are_a_no_op_and_do_not_import_ray() -> None:
    code = (
        "import sys\n"
        "from workers import telemetry\n"
        "from workers.telemetry import Stage\n"
        "telemetry.job_read('default')\n"
        "telemetry.result_written('default', 0.5, {Stage.SCORE: 0.3})\n"
        "telemetry.dead_letter('default', 'undecodable_image')\n"
        "telemetry.stream_backlog('default', 3, 1)\n"
        "assert not telemetry.enabled()\n"
        "assert 'ray' not in sys.modules, 'importing and recording must not import Ray'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
