"""Issue 13 on SQLite (the demo): no NOTIFY there, so waiters poll briefly; the outcome
write skips the notification and still records the job."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from models import JobKind
from models.db import make_engine, session_scope, set_engine
from models.migrate import upgrade
from tasks import admin, runner
from tasks.enqueue import build_job
from tasks.outcome_wait import async_wait_for_outcome, wait_for_outcome


@pytest.fixture()
def sqlite_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    upgrade(url)
    set_engine(make_engine(url))
    yield
    set_engine(None)  # the next get_engine() builds the suite's PostgreSQL engine again


def _queued_local_resolve() -> int:
    with session_scope() as db:
        session = admin.create_session(db, account_id=1, title="demo")
        db.flush()
        return build_job(db, JobKind.RESOLVE, session_id=session.id, markdown="Stored locally.").id


def test_a_waiter_on_sqlite_gets_the_outcome_the_runner_records(sqlite_db):
    job_id = _queued_local_resolve()
    assert wait_for_outcome(job_id, timeout=0.2).status == "pending"
    threading.Timer(0.3, runner.execute, args=(job_id,)).start()
    started = time.monotonic()
    o = wait_for_outcome(job_id, timeout=10)
    assert (o.status, o.http_status) == ("resolved_local", 200)
    assert time.monotonic() - started < 1.5


def test_the_asyncio_waiter_polls_on_sqlite_too(sqlite_db):
    job_id = _queued_local_resolve()
    threading.Timer(0.2, runner.execute, args=(job_id,)).start()
    o = asyncio.run(async_wait_for_outcome(job_id, timeout=10))
    assert o.status == "resolved_local"
