"""Engine and session setup. One engine per process, built from DATABASE_URL.

With no DATABASE_URL the demo falls back to a SQLite file under ./var so a newcomer can
see the whole flow with nothing installed; production and tests use PostgreSQL.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from models import prepared, settings

DEFAULT_SQLITE_PATH = Path("var") / "psa-writeback.db"

_lock = threading.Lock()
_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None


def database_url() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return normalize_url(url)
    private_dir(DEFAULT_SQLITE_PATH.parent)
    return f"sqlite:///{DEFAULT_SQLITE_PATH.resolve()}"


def private_dir(path: Path) -> Path:
    """Create (or tighten) a directory only its owner can enter: the demo's ./var holds a
    database with encrypted keys and note bodies, and broker messages."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def normalize_url(url: str) -> str:
    # Heroku-style URLs still say postgres://, which SQLAlchemy 2 rejects; and SQLAlchemy
    # 2.1 maps a bare postgresql:// to psycopg 3, while we ship psycopg2-binary.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        # WAL + busy timeout let the demo worker's threads and the CLI share one file.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


def make_engine(url: str | None = None, *, pool_size: int | None = None) -> Engine:
    url = normalize_url(url) if url else database_url()
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)
        _configure_sqlite(engine)
        return engine
    size, overflow, ping_idle = pool_settings()
    engine = create_engine(
        url,
        pool_size=pool_size or size,
        max_overflow=overflow,
        pool_recycle=1800,
        # A statement's parameters are note markdown and vendor strings: an error's text
        # must never carry them into a log line, a job's error_message or Flower.
        hide_parameters=True,
    )
    _ping_when_idle(engine, ping_idle)
    return engine


def pool_settings() -> tuple[int, int, float]:
    """DB_POOL_SIZE, DB_MAX_OVERFLOW, DB_POOL_PING_IDLE_SECONDS (see _ping_when_idle)."""
    return (settings.integer("DB_POOL_SIZE", 10, positive=True), settings.integer("DB_MAX_OVERFLOW", 5, minimum=0),
            settings.number("DB_POOL_PING_IDLE_SECONDS", 1, minimum=0))


def describe_error(err: BaseException) -> str:
    """What a database error was, without its text: `DataError (StringDataRightTruncation,
    SQLSTATE 22001)`. PostgreSQL's message and DETAIL quote values ("Failing row contains
    (...)" carries a whole row, note markdown included) and SQLAlchemy's adds the statement,
    so neither goes into an error_message, a log line or a task result."""
    orig = getattr(err, "orig", None)
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlite_errorname", None)
    inner = [type(orig).__name__] if orig is not None else []
    if code:
        inner.append(f"SQLSTATE {code}" if getattr(orig, "pgcode", None) else code)
    return f"{type(err).__name__} ({', '.join(inner)})" if inner else type(err).__name__


def is_db_error(err: BaseException) -> bool:
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(err, SQLAlchemyError) or type(err).__module__.startswith(("psycopg2", "sqlite3"))


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Survive pg_terminate_backend, failovers and server restarts: a pooled connection that
    sat unused for more than `idle_seconds` is pinged as it is checked out, and replaced if
    it is dead (SQLAlchemy's pessimistic recipe). SQLAlchemy's pool_pre_ping pings on every
    checkout: a round trip per transaction, a twentieth of a busy worker's CPU. A connection
    used a moment ago is not pinged; if the server dropped it in that moment, its first
    statement fails, SQLAlchemy discards the whole pool's connections, and the worker's
    db_retry runs the short transaction again on a new one."""
    import time

    from sqlalchemy import exc

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _stamp(_dbapi_conn, record, *_):
        record.info["pswb_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, _proxy):
        if time.monotonic() - record.info.get("pswb_idle_since", 0.0) <= idle_seconds:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as err:
            raise exc.DisconnectionError(f"pooled connection is dead: {err}") from err
        if not alive:
            raise exc.DisconnectionError("pooled connection is dead")


def _count_statements(engine: Engine, path: str) -> None:
    """Benchmarks count SQL statements per job: tally this process's statements and write the
    total to `path` at exit (PSA_WRITEBACK_SQL_COUNT_FILE)."""
    import atexit
    import json

    # round trips: psycopg2 sends BEGIN, each statement (or ;-joined string) and COMMIT
    # apart in an engine transaction; a round_trip() is one, statement and commit together
    counter = {"statements": 0, "commits": 0, "round_trips": 0}

    @event.listens_for(engine, "before_cursor_execute")
    def _tally(*_args):  # pragma: no cover - benchmark instrumentation
        counter["statements"] += 1
        counter["round_trips"] += 1

    @event.listens_for(engine, "begin")
    def _tally_begin(*_args):  # pragma: no cover - benchmark instrumentation
        counter["round_trips"] += 1

    @event.listens_for(engine, "commit")
    def _tally_commit(*_args):  # pragma: no cover - benchmark instrumentation
        counter["commits"] += 1
        counter["round_trips"] += 1

    def _tally_round_trip(*_args):  # pragma: no cover - benchmark instrumentation
        counter["statements"] += 1
        counter["commits"] += 1
        counter["round_trips"] += 1

    ROUND_TRIP_OBSERVERS.append(_tally_round_trip)
    atexit.register(lambda: Path(path).write_text(json.dumps(counter)))


def get_engine() -> Engine:
    global _engine, _factory
    with _lock:
        if _engine is None:
            _engine = make_engine()
            if os.environ.get("PSA_WRITEBACK_SQL_COUNT_FILE"):
                _count_statements(_engine, os.environ["PSA_WRITEBACK_SQL_COUNT_FILE"])
            _factory = sessionmaker(_engine, expire_on_commit=False)
        return _engine


def set_engine(engine: Engine | None) -> None:
    """Point this process at another engine (tests, the demo, the CLI's --database)."""
    global _engine, _factory
    with _lock:
        if _engine is not None and _engine is not engine:
            _engine.dispose()
        _engine = engine
        _factory = sessionmaker(engine, expire_on_commit=False) if engine is not None else None


def session_factory() -> sessionmaker[Session]:
    get_engine()
    assert _factory is not None
    return _factory


_HOOKED = "psa_writeback_outer_commit_hooks"


def after_outer_commit(db: Session, key: str, item: Any, run: Callable[[list[Any]], None]) -> None:
    """Call `run(items)` once `db`'s outermost transaction has committed, with every item
    registered under `key` meanwhile (messages announcing rows must not go out before the
    rows are visible). SQLAlchemy fires after_commit when a SAVEPOINT is released and
    after_rollback when one is rolled back, so neither says "the rows are committed" or "the
    rows are gone": an item is dropped only when the transaction it was registered in (or
    one around it) rolls back, and the rest wait for the outermost COMMIT."""
    db.info.setdefault(key, []).append((db.get_nested_transaction() or db.get_transaction(), item))
    hooked: set[str] = db.info.setdefault(_HOOKED, set())
    if key in hooked:
        return
    hooked.add(key)

    def committed(session: Session) -> None:
        outer = session.get_transaction()
        if outer is not None and outer.is_active:
            return  # a SAVEPOINT was released; the outer transaction is still open
        items = [i for _, i in session.info.pop(key, [])]
        if items:
            run(items)

    def rolled_back(session: Session, rolled: SessionTransaction) -> None:
        session.info[key] = [(t, i) for t, i in session.info.get(key, []) if not _inside(t, rolled)]

    event.listen(db, "after_commit", committed)
    event.listen(db, "after_soft_rollback", rolled_back)


def _inside(transaction: SessionTransaction | None, outer: SessionTransaction) -> bool:
    if outer.parent is None:  # the outermost transaction rolled back: everything goes
        return True
    while transaction is not None:
        if transaction is outer:
            return True
        transaction = transaction.parent
    return False


@contextlib.contextmanager
def transaction() -> Iterator[Connection]:
    """One short transaction on a Core connection, without an ORM session (the worker's
    hot path): commit on success, roll back on error, always return the connection."""
    with get_engine().begin() as conn:
        yield conn


class Row(dict):
    """A result row by attribute, like SQLAlchemy's."""
    __getattr__ = dict.__getitem__


def round_trip(sql: str, params: dict[str, Any], prefix: str = "") -> tuple[int, Row | None]:
    """Run `prefix` (none, or statements ending in `;`) then `sql` (one statement), PostgreSQL
    psycopg2 text, as a transaction of its own in ONE round trip; returns (rowcount, first row
    of `sql` or None). `sql` is sent as a prepared statement (models.prepared: its plan is
    reused; the first use on a connection adds the PREPARE's round trip).

    The worker's hot path: a transaction through SQLAlchemy costs BEGIN and COMMIT as round
    trips of their own (psycopg2 sends BEGIN before the first statement), three per
    transaction in all, and three transactions per job made PostgreSQL the second largest
    user of a zero-latency worker's machine. Sent on an autocommit connection, one
    statement commits by itself and a string of statements is one implicit transaction
    (PostgreSQL's simple query protocol): all or nothing, SET LOCAL and xact locks last to
    its end, and each statement still takes its own snapshot. Errors are SQLAlchemy's
    (OperationalError, IntegrityError...), parameters hidden, and a lost connection is
    dropped from the pool as SQLAlchemy drops one, so db_retry sees what it always saw."""
    from sqlalchemy.exc import DBAPIError

    engine = get_engine()
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        raw = engine.raw_connection()  # the pool's checkout events run: the idle ping too
    except dbapi_error as err:  # no connection (server down): what Engine.connect() raises
        raise DBAPIError.instance(None, None, err, dbapi_error, hide_parameters=True, dialect=engine.dialect,
                                  connection_invalidated=engine.dialect.is_disconnect(err, None, None)) from err
    dbapi = raw.driver_connection
    try:
        dbapi.autocommit = True  # a flag in psycopg2, no round trip
        try:
            with dbapi.cursor() as cur:
                cur.execute(prefix + prepared.executable(cur, sql), params)
                row = cur.fetchone() if cur.description else None
                names = [c.name for c in cur.description] if row is not None else []
                count = cur.rowcount
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
    except dbapi_error as err:
        lost = engine.dialect.is_disconnect(err, dbapi, None)
        if lost:
            engine.pool._invalidate(raw, err)  # as SQLAlchemy's own statements do on a disconnect
        else:
            prepared.forget(dbapi)
        raise DBAPIError.instance(prefix + sql, params, err, dbapi_error, hide_parameters=True,
                                  connection_invalidated=lost, dialect=engine.dialect) from err
    finally:
        raw.close()
    for observe in ROUND_TRIP_OBSERVERS:
        observe(prefix + sql, params)
    return count, (Row(zip(names, row)) if row is not None else None)


# Called with (sql, params) after each round_trip: benchmark instrumentation (round_trip
# bypasses the engine's cursor events, which _count_statements and bench.throughput use).
ROUND_TRIP_OBSERVERS: list[Callable[[str, dict[str, Any]], None]] = []


@contextlib.contextmanager
def session_scope() -> Iterator[Session]:
    """One short transaction: commit on success, roll back on error, always close."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
