"""The pool's dead-connection handling: an idle connection is pinged at checkout and
replaced if dead; one used a moment ago is not pinged (that round trip per transaction is
what pool_pre_ping would cost), and a dead one fails once, then the pool starts afresh."""
from __future__ import annotations

import os
import time

import pytest
from sqlalchemy import exc, text

from models.db import make_engine
from tests.harness import wait_for


@pytest.fixture()
def engine(monkeypatch):
    monkeypatch.setenv("DB_POOL_PING_IDLE_SECONDS", "0.3")
    eng = make_engine(os.environ["DATABASE_URL"], pool_size=1)
    yield eng
    eng.dispose()


def backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar()


def kill(engine, pid: int) -> None:
    """pg_terminate_backend returns once the signal is sent: wait until the backend is gone."""
    other = make_engine(os.environ["DATABASE_URL"], pool_size=1)

    def gone() -> bool:
        # a transaction of its own per look: pg_stat_activity is a snapshot per transaction
        with other.connect() as conn:
            return pid not in conn.execute(text("SELECT pid FROM pg_stat_activity")).scalars().all()

    try:
        with other.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar() is True
        wait_for(gone, timeout=10, interval=0.01, message=f"backend {pid} to exit")
    finally:
        other.dispose()


def test_an_idle_connection_killed_by_the_server_is_replaced_at_checkout(engine):
    dead = backend_pid(engine)
    kill(engine, dead)
    time.sleep(0.4)  # idle longer than DB_POOL_PING_IDLE_SECONDS: pinged, found dead, replaced
    assert backend_pid(engine) != dead


def test_a_connection_killed_right_after_use_fails_once_then_the_pool_recovers(engine):
    dead = backend_pid(engine)
    kill(engine, dead)  # within the idle window: no ping, so its next statement meets the dead socket
    with pytest.raises(exc.DBAPIError) as caught:
        backend_pid(engine)
    assert caught.value.connection_invalidated  # what tasks.store.transient_db_error retries on
    assert backend_pid(engine) not in (dead, None)
