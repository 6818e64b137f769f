"""Issue 11 sections 4 and 5 in the log formatters and the task base class: a vendor string
cannot forge a log line, and a database error's text (which can quote a value) is never
printed. Real PostgreSQL raises the errors."""
from __future__ import annotations

import io
import json
import logging
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError

from models.db import get_engine
from tasks.errors import DatabaseFailure
from worker import logs
from worker.app import app


def _logger(json_format: bool, monkeypatch) -> tuple[logging.Logger, io.StringIO]:
    monkeypatch.setenv("LOG_FORMAT", "json" if json_format else "text")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"))
    logger = logging.getLogger(f"psa_writeback.test.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    logs.install(logger)
    return logger, buf


def _quoting_db_error(value: str) -> DataError:
    """A real DataError whose own message quotes the value ('invalid input syntax for type
    integer: "..."'): hide_parameters cannot hide that part."""
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT CAST(:v AS integer)"), {"v": value})
    except DataError as err:
        return err
    raise AssertionError("no DataError")


@pytest.mark.parametrize("json_format", [False, True])
def test_a_vendor_message_with_a_newline_yields_one_log_line(json_format, monkeypatch):
    logger, buf = _logger(json_format, monkeypatch)
    vendor = "Token expired\n[2026-12-01 10:00:00,000: ERROR/MainProcess] ALERT auth_failed: re-auth at evil\r\x1b[2J"
    logger.warning("post_note failed: %s", vendor, extra={"job_id": 7, "step": "post", "note_id": "1 account_id=2"})
    out = buf.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")  # one line
    assert "\x1b" not in out and "\r" not in out
    assert "ALERT auth_failed" in out  # still readable, just not a line of its own
    if json_format:
        assert json.loads(out)["note_id"] == "1 account_id=2"
    else:
        assert " account_id=2" not in out.replace('note_id="1 account_id=2"', "")  # no forged pair


@pytest.mark.parametrize("json_format", [False, True])
def test_a_database_errors_text_never_reaches_the_log(json_format, monkeypatch):
    logger, buf = _logger(json_format, monkeypatch)
    marker = f"note-{uuid.uuid4().hex}"
    err = _quoting_db_error(marker)
    assert marker in str(err)  # the driver's text does quote it
    try:
        raise RuntimeError("outcome write failed") from err
    except RuntimeError:
        logger.exception("unexpected error")
    out = buf.getvalue()
    assert marker not in out
    assert "DataError (InvalidTextRepresentation, SQLSTATE 22P02)" in out
    assert "outcome write failed" in out and "Traceback" in out


def test_a_database_error_leaving_any_task_is_named_without_its_text():
    marker = f"note-{uuid.uuid4().hex}"

    @app.task(name="test.db_error." + uuid.uuid4().hex[:8])
    def broken() -> None:
        raise _quoting_db_error(marker)

    with pytest.raises(DatabaseFailure) as caught:
        broken()  # Task.__call__, as the worker runs it
    message = str(caught.value)
    assert marker not in message
    assert "DataError (InvalidTextRepresentation, SQLSTATE 22P02)" in message
    assert "test_log_lines.py" in message  # where it was raised
    assert caught.value.__suppress_context__ and caught.value.__cause__ is None
