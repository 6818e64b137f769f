"""Server-side prepared statements for models.db.round_trip (PostgreSQL, psycopg2).

The worker's claim and outcome are single statements of a few kilobytes (CTEs, subqueries):
PostgreSQL spent more time planning the claim than running it (1.1-1.4 ms against 0.1 ms,
EXPLAIN ANALYZE on the benchmark's machine), on every job. psycopg2 sends parameters inline,
so nothing is cached between executions; here each such statement is PREPAREd once per
connection (a round trip of its own, the first time that connection sends it) and then sent
as `EXECUTE name(args)`, whose plan PostgreSQL reuses (a generic plan once it is as cheap
as the custom ones, after 5 runs).

A statement that cannot be prepared (PostgreSQL cannot infer a parameter's type, the text
has a literal % or a `;`) is sent as it is. After any error on a connection its prepared
statements are deallocated and forgotten: whatever went wrong, the next use prepares afresh.
"""
from __future__ import annotations

import hashlib
import re
import threading
import weakref
from typing import Any

import psycopg2

# sql text -> (PREPARE text, EXECUTE template with psycopg2 parameters), or None: send as is
_FORMS: dict[str, tuple[str, str] | None] = {}
MAX_FORMS = 256  # distinct statements (the outcome's varies with its column set); the rest go as is
# psycopg2 connection -> names prepared on it (the object, not the pool's record: a
# reconnected pool slot is a new connection object with nothing prepared)
_ON: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_PARAM = re.compile(r"%\((\w+)\)s")


def _form(sql: str) -> tuple[str, str] | None:
    if sql in _FORMS:
        return _FORMS[sql]
    names: list[str] = []

    def positional(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = _PARAM.sub(positional, sql)
    form = None
    # one statement only: PREPARE of "a; b" would prepare a and run b at once
    if "%" not in text and ";" not in text and len(_FORMS) < MAX_FORMS:
        name = "pswb_" + hashlib.sha1(sql.encode()).hexdigest()[:24]
        args = f"({', '.join(f'%({n})s' for n in names)})" if names else ""
        form = (f"PREPARE {name} AS {text}", f"EXECUTE {name}{args}")
    with _LOCK:
        return _FORMS.setdefault(sql, form)


def executable(cursor: Any, sql: str) -> str:
    """What to send for `sql` (one statement, psycopg2 %(name)s parameters) on `cursor`'s
    connection: EXECUTE of its prepared form, PREPAREd first if this connection has not yet;
    or `sql` itself when it cannot be prepared."""
    form = _form(sql)
    if form is None:
        return sql
    prepare, execute = form
    conn = cursor.connection
    with _LOCK:
        done = _ON.setdefault(conn, set())
        if prepare in done:
            return execute
    try:
        cursor.execute(prepare)  # no parameters: psycopg2 sends the text as it is
    except psycopg2.Error as err:
        code = getattr(err, "pgcode", None) or ""
        if code == "42P05" and not conn.closed:  # already prepared (forgotten after an error that kept it)
            with _LOCK:
                done.add(prepare)
            return execute
        if conn.closed or not code.startswith("42"):
            # A lost connection, a cancelled statement, a server shutting down: not this
            # statement's fault. Raised as any error of the round trip (db_retry decides),
            # so one bad moment does not leave it unprepared for the process's life.
            raise
        with _LOCK:  # class 42, e.g. a parameter whose type PostgreSQL cannot infer: send this one as is
            _FORMS[sql] = None
        return sql
    with _LOCK:
        done.add(prepare)
    return execute


def forget(conn: Any) -> None:
    """After an error on `conn`: deallocate and forget what was prepared on it."""
    with _LOCK:
        had = _ON.pop(conn, None)
    if had and not conn.closed:
        try:
            with conn.cursor() as cur:
                cur.execute("DEALLOCATE ALL")
        except psycopg2.Error:
            pass  # a broken connection: the pool replaces it, and with it its statements
