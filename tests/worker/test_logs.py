"""worker.logs.ContextFilter on its own: which context a line naming a job gets, and when
the job resolver (a database read) is asked."""
from __future__ import annotations

import logging
from typing import Any

import pytest

from worker import logs


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("psa_writeback.test", logging.INFO, __file__, 1, "line", None, None)
    for name, value in extra.items():
        setattr(record, name, value)
    return record


@pytest.fixture()
def resolver():
    calls: list[int] = []

    def fake(job_id: int) -> dict[str, Any]:
        calls.append(job_id)
        return {"account_id": 900 + job_id, "provider": "connectwise", "ticket_id": 5000 + job_id}

    logs.clear()
    logs.set_job_resolver(fake)
    yield calls
    logs.set_job_resolver(None)
    logs.clear()


def test_a_line_that_carries_its_account_is_not_looked_up(resolver):
    logs.bind(task_id="t-1", task_name="writeback.check_stuck", job_id=1, account_id=11, provider="halo",
              ticket_id=111)
    record = _record(job_id=2, account_id=22, ticket_id=222)
    assert logs.ContextFilter().filter(record) is True
    assert resolver == []
    assert (record.job_id, record.account_id, record.ticket_id) == (2, 22, 222)
    assert getattr(record, "provider", None) is None  # not the task's job's provider
    assert (record.task_id, record.task_name) == ("t-1", "writeback.check_stuck")


def test_a_resolved_line_does_not_change_the_context_of_the_next(resolver):
    logs.bind(task_id="t-2", task_name="writeback.check_stuck")  # a beat task: no job of its own
    log_filter = logs.ContextFilter()
    first = _record(job_id=7)
    log_filter.filter(first)
    assert resolver == [7]
    assert (first.job_id, first.account_id, first.provider, first.ticket_id) == (7, 907, "connectwise", 5007)
    assert first.task_id == "t-2"

    second = _record()
    log_filter.filter(second)
    assert resolver == [7]
    assert second.task_id == "t-2"
    for name in ("job_id", "account_id", "provider", "ticket_id"):
        assert getattr(second, name, None) is None, name


def test_a_line_about_the_tasks_own_job_takes_the_context_without_a_lookup(resolver):
    logs.bind(task_id="t-3", job_id=3, account_id=33, provider="autotask", ticket_id=333)
    record = _record(job_id=3)
    logs.ContextFilter().filter(record)
    assert resolver == []
    assert (record.account_id, record.provider, record.ticket_id) == (33, "autotask", 333)


@pytest.mark.parametrize("text", [
    "Authorization: Basic c2ltY286cHJpdmF0ZQ==", "AUTHORIZATION: BEARER abcdefghijkl", "private_key=abc",
    "PublicKey: 'xyz'", "password = hunter2", 'secret": "s3"', "sent BaSiC Zm9vYmFyYmF6", "status PATCH answered 200",
    "job 12 succeeded (verified) after 1 attempt(s)", "\u017fecret=x", "authorizat\u0131on: token-123",
    "private_\u212aey=abc", "key", "no words here \u00e9",
])
def test_the_quick_secret_check_never_misses_what_the_pattern_finds(text):
    # may_hold_secret only skips the pattern where it cannot match
    if logs._SECRET.search(text):
        assert logs.may_hold_secret(text), text


def test_a_line_with_a_secret_is_still_scrubbed():
    record = logging.LogRecord("psa_writeback.test", logging.INFO, __file__, 1, "sent %s", ("password=hunter2",), None)
    logs.ContextFilter().filter(record)
    assert "hunter2" not in record.getMessage() and "[redacted]" in record.getMessage()
