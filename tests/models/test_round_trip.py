"""models.db.round_trip, the worker's one-round-trip transactions, on real PostgreSQL: all
or nothing, SET LOCAL and xact locks end with it, the pooled connection goes back ready
for ordinary transactions, and errors are the SQLAlchemy errors db_retry knows."""
from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import exc, text

from models import db as models_db
from models.db import make_engine, round_trip
from tasks.store import db_retry, transient_db_error
from tests.models.test_pool import backend_pid, kill


@pytest.fixture()
def engine(monkeypatch):
    monkeypatch.setenv("DB_POOL_PING_IDLE_SECONDS", "30")  # no ping: a dead connection is met by the statement
    eng = make_engine(os.environ["DATABASE_URL"], pool_size=1)
    eng.pool._max_overflow = 0  # one connection: every round trip and check below shares it
    models_db.set_engine(eng)
    yield eng
    models_db.set_engine(None)  # disposes eng; the next get_engine() builds the usual one


@pytest.fixture()
def table(engine):
    name = f"rt_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)"))
    yield name
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {name}"))


def rows(engine, table: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(f"SELECT id, v FROM {table} ORDER BY id"))]


def test_returns_the_row_count_and_the_last_statements_first_row_by_name(engine, table):
    count, row = round_trip(f"INSERT INTO {table} VALUES (%(a)s, 'x'), (%(b)s, 'y')", {"a": 1, "b": 2})
    assert (count, row) == (2, None)
    count, row = round_trip(f"SELECT id, v FROM {table} ORDER BY id", {"id": 1},
                            prefix=f"UPDATE {table} SET v = 'z' WHERE id = %(id)s; ")
    assert count == 2 and row == {"id": 1, "v": "z"} and row.v == "z"
    assert rows(engine, table) == [(1, "z"), (2, "y")]
    # statements joined in `sql` itself are not prepared (PREPARE would take the first only)
    count, row = round_trip(f"UPDATE {table} SET v = 'w' WHERE id = 2; SELECT id, v FROM {table} ORDER BY id DESC", {})
    assert count == 2 and row == {"id": 2, "v": "w"}


def test_its_statements_commit_together_or_not_at_all(engine, table):
    with pytest.raises(exc.IntegrityError) as caught:
        round_trip(f"INSERT INTO {table} VALUES (1, %(secret)s); INSERT INTO {table} VALUES (1, 'dup')",
                   {"secret": "fake-note-body-7731"})
    assert rows(engine, table) == []  # the first INSERT went with the second
    assert "fake-note-body-7731" not in str(caught.value)  # parameters hidden, as on the engine
    assert not transient_db_error(caught.value)  # a real error: db_retry does not run it again


def test_set_local_and_xact_locks_last_to_its_end_only(engine):
    _, row = round_trip("SET LOCAL synchronous_commit TO off; SELECT pg_advisory_xact_lock(918273); "
                        "SELECT current_setting('synchronous_commit') AS durability, "
                        "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 918273 "
                        " AND pid = pg_backend_pid()) AS locks", {})
    assert row == {"durability": "off", "locks": 1}
    # the same (only) pooled connection, next round trip: both are gone
    _, row = round_trip("SELECT current_setting('synchronous_commit') AS durability, "
                        "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 918273) AS locks", {})
    assert row == {"durability": "on", "locks": 0}


def test_the_connection_goes_back_to_the_pool_transactional(engine, table):
    round_trip(f"INSERT INTO {table} VALUES (1, 'kept')", {})
    # an ordinary transaction on the same connection afterwards still rolls back
    with engine.connect() as conn:
        conn.execute(text(f"INSERT INTO {table} VALUES (2, 'rolled back')"))
        conn.rollback()
    assert rows(engine, table) == [(1, "kept")]


def test_a_connection_the_server_killed_fails_once_as_transient_then_the_pool_recovers(engine):
    dead = backend_pid(engine)
    kill(engine, dead)
    with pytest.raises(exc.DBAPIError) as caught:
        round_trip("SELECT 1 AS one", {})
    assert caught.value.connection_invalidated and transient_db_error(caught.value)
    _, row = round_trip("SELECT pg_backend_pid() AS pid", {})
    assert row.pid != dead


def test_no_server_is_an_operational_error_db_retry_knows(monkeypatch):
    eng = make_engine("postgresql://pswb@127.0.0.1:9/nowhere", pool_size=1)  # port 9: nothing listens
    models_db.set_engine(eng)
    try:
        with pytest.raises(exc.OperationalError) as caught:
            round_trip("SELECT 1", {})
        assert transient_db_error(caught.value)
    finally:
        models_db.set_engine(None)


def test_a_lost_connection_renews_the_pools_other_connections_too(monkeypatch):
    # a server restart kills every pooled connection: after the first failure, the next
    # round trip must not meet the next dead one (what SQLAlchemy does on a disconnect)
    monkeypatch.setenv("DB_POOL_PING_IDLE_SECONDS", "30")
    eng = make_engine(os.environ["DATABASE_URL"], pool_size=2)
    models_db.set_engine(eng)
    try:
        with eng.connect() as first, eng.connect() as second:
            pids = [c.execute(text("SELECT pg_backend_pid()")).scalar() for c in (first, second)]
        for pid in pids:
            kill(eng, pid)
        with pytest.raises(exc.DBAPIError) as caught:
            round_trip("SELECT 1 AS one", {})
        assert transient_db_error(caught.value)
        _, row = round_trip("SELECT pg_backend_pid() AS pid", {})
        assert row.pid not in pids
    finally:
        models_db.set_engine(None)


def test_a_statement_is_prepared_once_per_connection_and_its_plan_reused(engine, table):
    for i in range(7):
        round_trip(f"INSERT INTO {table} VALUES (%(id)s, %(v)s)", {"id": i, "v": f"n{i}"})
    _, row = round_trip("SELECT count(*) AS n, sum(generic_plans + custom_plans) AS runs FROM pg_prepared_statements "
                        f"WHERE statement LIKE %(pattern)s", {"pattern": f"%INSERT INTO {table} VALUES ($1, $2)%"})
    assert (row.n, row.runs) == (1, 7)  # the only pooled connection: prepared once, executed 7 times
    assert len(rows(engine, table)) == 7


def test_after_an_error_the_connections_statements_are_prepared_afresh(engine, table):
    insert = f"INSERT INTO {table} VALUES (%(id)s, 'x')"
    round_trip(insert, {"id": 1})
    with pytest.raises(exc.IntegrityError):
        round_trip(insert, {"id": 1})
    # deallocated and forgotten: the next use prepares it again, and works
    assert round_trip(insert, {"id": 2})[0] == 1
    _, row = round_trip("SELECT count(*) AS n FROM pg_prepared_statements WHERE statement LIKE %(p)s",
                        {"p": f"%INSERT INTO {table}%"})
    assert row.n == 1 and len(rows(engine, table)) == 2


def test_a_statement_postgresql_cannot_prepare_is_sent_as_it_is(engine):
    # unknown + unknown: PREPARE cannot pick an operator, while the inlined values can
    sql = "SELECT %(a)s + %(b)s AS total"
    assert round_trip(sql, {"a": 1, "b": 2})[1] == {"total": 3}
    assert round_trip(sql, {"a": 4, "b": 5})[1] == {"total": 9}  # remembered: no second PREPARE attempt
    _, row = round_trip("SELECT count(*) AS n FROM pg_prepared_statements WHERE statement LIKE %(p)s",
                        {"p": "%$1 + $2%"})
    assert row.n == 0


def test_a_prepared_statement_dropped_behind_its_back_is_retried_and_prepared_again(engine, table):
    # a pooler's DISCARD ALL, or an operator's DEALLOCATE: the next EXECUTE meets "does not exist"
    insert = f"INSERT INTO {table} VALUES (%(id)s, 'x')"
    round_trip(insert, {"id": 1})
    raw = engine.raw_connection()  # the pool's only connection, the one the statement is on
    try:
        with raw.driver_connection.cursor() as cur:
            cur.execute("DEALLOCATE ALL")
        raw.driver_connection.commit()
    finally:
        raw.close()
    with pytest.raises(exc.DBAPIError) as caught:
        round_trip(insert, {"id": 2})
    assert transient_db_error(caught.value)  # db_retry runs it again...
    attempts = []

    @db_retry
    def insert_three():
        attempts.append(1)
        return round_trip(insert, {"id": 3})[0]

    assert insert_three() == 1 and len(attempts) == 1  # ...and by then it is prepared afresh
    assert rows(engine, table) == [(1, "x"), (3, "x")]


def test_a_prepare_that_fails_for_a_passing_reason_is_raised_and_tried_again_later():
    # Not the statement's fault (no SQLSTATE of class 42): the error is the round trip's, and
    # the statement stays preparable, instead of going unprepared for the process's life.
    import psycopg2

    from models import prepared

    class Cursor:
        connection = type("Conn", (), {"closed": 0})()

        def execute(self, _sql):
            raise psycopg2.OperationalError("canceling statement due to user request")

    sql = f"SELECT 1 AS one_{uuid.uuid4().hex[:8]} WHERE %(x)s::int > 0"
    with pytest.raises(psycopg2.OperationalError):
        prepared.executable(Cursor(), sql)
    assert prepared._FORMS[sql] is not None
