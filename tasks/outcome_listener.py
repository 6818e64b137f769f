"""One LISTEN connection per web process, shared by every waiting request.

A thread holds a dedicated psycopg2 connection (outside the SQLAlchemy pool, so it never
counts against the pool nor gets recycled under us) LISTENing on models.notify.CHANNELS,
blocks in select() on its socket, and wakes only the waiters of the row a notification
names. When the connection is lost (pg_terminate_backend, failover, a dropped network) it
reconnects, and once LISTEN is active again it wakes *every* waiter: notifications sent
while it was away are gone, so each waiter reads its row once more.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from models.db import get_engine
from models.notify import CHANNELS

log = logging.getLogger("psa_writeback.outcome")

APPLICATION_NAME = "psa-writeback-outcome-listener"  # how ops (and tests) find it in pg_stat_activity
_SELECT_SECONDS = 1.0  # how often the thread looks at its stop flag; no query is sent
_PING_IDLE_SECONDS = 30.0  # a silent connection is checked this often (keepalives also run)
_RECONNECT_MAX_SECONDS = 5.0


class Waker(Protocol):
    def wake(self) -> None: ...


def connect_postgres() -> Any:
    """A psycopg2 connection with the engine's own connect arguments, autocommit (LISTEN
    takes effect at once), named, with TCP keepalives so a silently dead peer is noticed."""
    engine = get_engine()
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    params = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3, **cparams, "application_name": APPLICATION_NAME}
    conn = engine.dialect.loaded_dbapi.connect(*cargs, **params)
    conn.autocommit = True
    return conn


class Listener:
    def __init__(self, connect: Callable[[], Any] = connect_postgres, channels: tuple[str, ...] = CHANNELS) -> None:
        self._connect = connect
        self.channels = channels
        self._lock = threading.Lock()
        self._waiters: dict[tuple[str, str], set[Waker]] = {}
        self._listening = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.backend_pid: int | None = None  # of the LISTEN connection, while connected
        self.connects = 0  # LISTENs established (1 + reconnects)
        self.notifications = 0
        self.peak_waiters = 0

    # -- waiters --------------------------------------------------------------------------
    def subscribe(self, channel: str, row_id: int, waker: Waker) -> None:
        with self._lock:
            self._waiters.setdefault((channel, str(row_id)), set()).add(waker)
            self.peak_waiters = max(self.peak_waiters, self.waiting_unlocked())
        self.start()

    def unsubscribe(self, channel: str, row_id: int, waker: Waker) -> None:
        key = (channel, str(row_id))
        with self._lock:
            wakers = self._waiters.get(key)
            if wakers is not None:
                wakers.discard(waker)
                if not wakers:
                    del self._waiters[key]

    def waiting(self) -> int:
        with self._lock:
            return self.waiting_unlocked()

    def waiting_unlocked(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def listening(self) -> bool:
        return self._listening.is_set()

    def wait_listening(self, timeout: float) -> bool:
        return self._listening.wait(timeout)

    def _wake(self, key: tuple[str, str] | None) -> None:
        with self._lock:
            wakers = [w for ws in self._waiters.values() for w in ws] if key is None else \
                list(self._waiters.get(key, ()))
        for waker in wakers:
            waker.wake()

    # -- the thread -----------------------------------------------------------------------
    def start(self) -> "Listener":
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="outcome-listener", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._connect()
                with conn.cursor() as cur:
                    cur.execute(self._listen_sql())
                self.backend_pid = conn.get_backend_pid()
                self.connects += 1
                self._listening.set()
                delay = 0.05
                self._wake(None)  # anything sent while we were not listening is lost: read again
                self._serve(conn)
            except Exception as err:  # the DB went away or refused us: reconnect with backoff
                if not self._stop.is_set():
                    log.warning("outcome listener lost its connection (%s); reconnecting", type(err).__name__)
            finally:
                self._listening.clear()
                self.backend_pid = None
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            if not self._stop.is_set():
                self._stop.wait(delay)
                delay = min(delay * 2, _RECONNECT_MAX_SECONDS)

    def _listen_sql(self) -> str:
        return "; ".join(f"LISTEN {c}" for c in self.channels)

    def _serve(self, conn: Any) -> None:
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            readable, _, _ = select.select([conn], [], [], _SELECT_SECONDS)
            if not readable:
                if time.monotonic() - quiet_since > _PING_IDLE_SECONDS:
                    with conn.cursor() as cur:  # raises if the server is gone; LISTEN is idempotent
                        cur.execute(self._listen_sql())
                    quiet_since = time.monotonic()
                continue
            conn.poll()  # raises OperationalError when the server closed the connection
            quiet_since = time.monotonic()
            while conn.notifies:
                note = conn.notifies.pop(0)
                self.notifications += 1
                self._wake((note.channel, note.payload))


_listener: Listener | None = None
_owner: tuple[int, str] | None = None
_singleton_lock = threading.Lock()


def listener() -> Listener:
    """This process's listener, for the current engine. A forked child (a preforking web
    server) gets its own: a connection must never be shared across processes."""
    global _listener, _owner
    owner = (os.getpid(), str(get_engine().url))
    with _singleton_lock:
        if _listener is None or _owner != owner:
            if _listener is not None and _owner is not None and _owner[0] == owner[0]:
                _listener.stop(timeout=0)  # the engine changed (tests, the CLI's --database)
            _listener, _owner = Listener(), owner
        return _listener


def shutdown(timeout: float = 5.0) -> None:
    """Stop this process's listener and close its connection (a web server's shutdown hook;
    tests before they drop their database). The next waiter starts a new one."""
    global _listener, _owner
    with _singleton_lock:
        lst, _listener, _owner = _listener, None, None
    if lst is not None:
        lst.stop(timeout)
