"""A job row from an intent: the checks and the insert shared by the enqueue API
(tasks.enqueue.build_job, in the caller's transaction) and the tasks called by name with
the intent (store.claim, just before the claim).

`plan()` reads the session, its PSA connection, the account's preferences, the job already
holding the idempotency key and the session's live job of the same kind in one SELECT, then
runs every check in a fixed order (the first problem found is the one reported);
`create_job` inserts the planned row with one statement. An ORM look-up per fact plus the
unit of work cost a third of a by-name job's CPU.

Without a connection (a task sent by name, on PostgreSQL) the SELECT and the INSERT are one
prepared round trip each (models.db.round_trip), with no transaction around them: the
checks read at each statement's own snapshot either way (READ COMMITTED), and what a
racing writer could slip in between (the same key, a live job of the session) is caught by
the INSERT's unique indexes, as in a transaction. Through SQLAlchemy, in one transaction with
its claim, a by-name job cost 1.17 x the worker CPU of a job the enqueue API wrote; this way
1.06 x (bench.cpu, 3 rounds each; README "Benchmark").
"""
from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Integer, String, and_, bindparam, func, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlalchemy.sql import Executable

from models import AccountSettings, AiSession, JobKind, JobState, NoteVisibility, PsaConnection, WritebackJob, utcnow
from models.db import round_trip
from providers import REGISTRY
from tasks import validation as v
from tasks.errors import ConflictError, NotFoundError, RequestError
from tasks.retry import RetryPolicy

log = logging.getLogger("psa_writeback.enqueue")

_NOTE_OF = {JobKind.RESOLVE: NoteVisibility.RESOLUTION, JobKind.ESCALATE: NoteVisibility.INTERNAL}
_PREF_SUFFIX = {JobKind.RESOLVE: "resolved_status_id", JobKind.ESCALATE: "escalated_status_id"}
_ENDED = [JobState.FAILED.value, JobState.CANCELLED.value]

_S, _C, _A = AiSession, PsaConnection, AccountSettings
_KEYED = aliased(WritebackJob, name="keyed")  # the job already holding the idempotency key
_LIVE = aliased(WritebackJob, name="live")  # a live job of the same kind on the session
# inline, not a list parameter: the statement's text is prepared as it is (_first)
_ENDED_INLINE = [literal_column(f"'{s}'") for s in _ENDED]
_FACTS = (
    select(_S.id, _S.account_id, _S.psa_connection_id, _S.psa_ticket_id, _S.resolution_note_posted_at, _S.escalation_package_posted_at,
           _C.id.label("connection_id"), _C.account_id.label("connection_account_id"),
           _C.is_active.label("connection_active"), _C.provider.label("provider"),
           _A.preferences.label("preferences"),
           _KEYED.id.label("keyed_id"), _KEYED.kind.label("keyed_kind"), _KEYED.session_id.label("keyed_session_id"),
           select(_LIVE.id).where(_LIVE.session_id == _S.id, _LIVE.kind == bindparam("kind", type_=String),
                                  _LIVE.state.notin_(_ENDED_INLINE)).limit(1).scalar_subquery().label("live_id"))
    .select_from(_S)
    # the connection asked for, else the session's own
    .outerjoin(_C, _C.id == func.coalesce(bindparam("connection", type_=Integer), _S.psa_connection_id))
    .outerjoin(_A, _A.account_id == _S.account_id)
    # keys are scoped per account: a tenant can neither see nor pre-empt another's keys
    .outerjoin(_KEYED, and_(_KEYED.account_id == _S.account_id,
                            _KEYED.idempotency_key == bindparam("key", type_=String)))
    .where(_S.id == bindparam("session_id", type_=Integer)))


@dataclass
class Plan:
    values: dict[str, Any]  # the new row's columns (empty when `existing` is set)
    existing: int | None = None  # the job that already holds this idempotency key, same intent


def plan(db: Connection | None, kind: JobKind, *, session_id: Any, markdown: Any = None, visibility: Any = None,
         status_id: Any = None, idempotency_key: Any = None, psa_connection_id: Any = None,
         max_attempts: Any = None, account_id: Any = None) -> Plan:
    """Validate the intent against the database (`db`, or None: PostgreSQL, one round trip);
    raise RequestError (NotFoundError, ConflictError) naming the first problem, or return
    the row to insert. `account_id`, when given, is the web tier's guard: the session must
    be that account's."""
    session_id = v.positive_int(session_id, "session_id")
    key = v.idempotency_key(idempotency_key)
    guard = v.positive_int(account_id, "account_id") if account_id is not None else None
    override, override_error = None, None
    try:  # needed by the query; its error is reported where the connection is checked
        override = v.positive_int(psa_connection_id, "psa_connection_id") if psa_connection_id is not None else None
    except RequestError as err:
        override_error = err
    facts = _first(db, _FACTS, {"session_id": session_id, "key": key, "kind": kind.value, "connection": override})
    if guard is not None and (facts is None or facts["account_id"] != guard):
        # One message whether the session is another tenant's or does not exist at all:
        # the caller learns nothing about other accounts' ids.
        raise NotFoundError(f"unknown session {session_id} for account {guard}", field="session_id")
    if facts is None:
        raise NotFoundError(f"unknown session {session_id}", field="session_id")
    if key is not None and facts["keyed_id"] is not None:
        same_intent_or_conflict(facts["keyed_id"], facts["keyed_kind"], facts["keyed_session_id"], kind, session_id)
        return Plan({}, existing=facts["keyed_id"])
    row: dict[str, Any] = dict(kind=kind.value, session_id=session_id, account_id=facts["account_id"],
                               published_at=utcnow(),
                               idempotency_key=key or f"{kind.value}:{session_id}:{uuid.uuid4().hex}")
    row["max_attempts"] = (min(v.positive_int(max_attempts, "max_attempts"), 50) if max_attempts is not None
                           else RetryPolicy.from_env().max_attempts)
    if kind in (JobKind.RESOLVE, JobKind.ESCALATE, JobKind.POST_NOTE):
        row["markdown"] = v.markdown(markdown)
        row["note_visibility"] = (_NOTE_OF.get(kind) or v.visibility(visibility)).value
    elif markdown is not None or visibility is not None:
        raise RequestError("transition_status takes no markdown or visibility")
    if override_error is not None:
        raise override_error
    linked = _check_connection(facts, session_id, override)
    if kind in (JobKind.RESOLVE, JobKind.ESCALATE):
        _refuse_if_already_posted(facts, session_id, kind)
    if not linked:
        if kind in (JobKind.POST_NOTE, JobKind.TRANSITION_STATUS):
            raise RequestError(f"session {session_id} has no PSA linked: there is no ticket to write to",
                               field="session_id")
        row["ticket_key"] = f"session:{session_id}"
        return Plan(row)
    ticket = facts["psa_ticket_id"]
    if ticket is None:
        raise RequestError(f"session {session_id} is linked to a PSA but has no ticket id", field="session_id")
    row.update(psa_connection_id=facts["connection_id"], provider=facts["provider"], ticket_id=ticket,
               ticket_key=f"{facts['connection_id']}:{ticket}")
    if kind is JobKind.TRANSITION_STATUS:
        row["target_status_id"] = v.positive_int(status_id, "status_id")
    elif status_id is not None:
        raise RequestError(f"{kind.value} takes its target status from the account's preferences, not status_id",
                           field="status_id")
    elif kind in _PREF_SUFFIX:
        row["target_status_id"], row["transition_skipped_reason"] = target_status(
            facts["preferences"], facts["account_id"], facts["provider"], kind)
    return Plan(row)


def _check_connection(facts: Any, session_id: int, override: int | None) -> bool:
    """Whether the job writes to a PSA (the session's connection, or the one asked for)."""
    if facts["connection_id"] is None:
        asked = override if override is not None else facts["psa_connection_id"]
        if asked is not None:
            raise NotFoundError(f"unknown PSA connection {asked}", field="psa_connection_id")
        return False  # the session is not linked to a PSA
    conn_id = facts["connection_id"]
    if facts["connection_account_id"] != facts["account_id"]:
        raise RequestError(f"PSA connection {conn_id} belongs to another account than session {session_id}",
                           field="psa_connection_id")
    if not facts["connection_active"]:
        raise RequestError(f"PSA connection {conn_id} is inactive", field="psa_connection_id")
    if facts["provider"] not in REGISTRY:
        raise RequestError(f"PSA connection {conn_id} uses unsupported provider {facts['provider']!r}",
                           field="psa_connection_id")
    return True


def _refuse_if_already_posted(facts: Any, session_id: int, kind: JobKind) -> None:
    resolve = kind is JobKind.RESOLVE
    posted = facts["resolution_note_posted_at"] if resolve else facts["escalation_package_posted_at"]
    what = "resolution" if resolve else "escalation package"
    if posted is not None:
        raise ConflictError(f"session {session_id}'s {what} was already posted at {posted.isoformat()}")
    if facts["live_id"] is not None:
        raise ConflictError(f"session {session_id} already has a {kind.value} writeback (job {facts['live_id']})")


def target_status(preferences: dict[str, Any] | None, account_id: int, provider: str,
                  kind: JobKind) -> tuple[int | None, str | None]:
    """The account's status for this kind, or (None, why not). Status ids are board-specific:
    we never guess a default."""
    pref_key = f"{REGISTRY[provider].preference_prefix}_{_PREF_SUFFIX[kind]}"
    value = (preferences or {}).get(pref_key)
    if value is None:
        return None, f"{pref_key} is not set in the account's preferences; the status was left unchanged"
    if not v.is_status_id(value):
        log.warning("account %s preference %s is not a positive integer (%r); skipping the status change",
                    account_id, pref_key, type(value).__name__)
        return None, f"{pref_key} is set to a value that is not a positive integer ({str(value)[:40]!r}); " \
                     "treated as unset, the status was left unchanged"
    return value, None


def same_intent_or_conflict(existing_id: int, existing_kind: str, existing_session: int, kind: JobKind,
                            session_id: int) -> None:
    if existing_kind != kind.value or existing_session != session_id:
        raise ConflictError(f"idempotency_key was already used for job {existing_id} "
                            f"({existing_kind} of session {existing_session})", field="idempotency_key")


# Every column the job row is inserted with: the plan's, then those with a model default
# (given here as values, so that a driver-SQL insert needs no SQLAlchemy to fill them).
_PLANNED = ("kind", "session_id", "account_id", "published_at", "idempotency_key", "max_attempts", "markdown",
            "note_visibility", "ticket_key", "psa_connection_id", "provider", "ticket_id", "target_status_id",
            "transition_skipped_reason")
_DEFAULTS = {c.key: c.default for c in WritebackJob.__table__.columns
             if c.default is not None and c.key not in _PLANNED and not c.primary_key}
_COLUMNS = _PLANNED + tuple(_DEFAULTS)
_INSERTS = {postgres: (postgresql if postgres else sqlite).insert(WritebackJob)
            .values({c: bindparam(c, type_=WritebackJob.__table__.c[c].type) for c in _COLUMNS})
            .on_conflict_do_nothing().returning(WritebackJob.id) for postgres in (True, False)}
_HOLDER = (select(WritebackJob.id, WritebackJob.kind, WritebackJob.session_id)
           .where(WritebackJob.account_id == bindparam("account_id", type_=Integer),
                  WritebackJob.idempotency_key == bindparam("idempotency_key", type_=String)))


def row_values(planned: dict[str, Any]) -> dict[str, Any]:
    """The planned row with every column of the insert: absent planned ones NULL, the rest
    their model defaults (utcnow() called per row, as SQLAlchemy would)."""
    unknown = set(planned) - set(_PLANNED)
    if unknown:
        raise AssertionError(f"plan() produced columns the insert does not know: {sorted(unknown)}")
    values = dict.fromkeys(_PLANNED)
    values.update(planned)
    for key, default in _DEFAULTS.items():
        values[key] = default.arg(None) if default.is_callable else default.arg
    return values


@functools.cache
def _driver_sql(stmt: Executable) -> tuple[str, dict[str, Any]]:
    """`stmt` as PostgreSQL psycopg2 text for round_trip (which prepares it once per
    connection), and the values its own bound parameters carry (a LIMIT's, say)."""
    compiled = stmt.compile(dialect=postgresql.psycopg2.dialect())
    return str(compiled), {k: v for k, v in compiled.params.items() if v is not None}


def _first(conn: Connection | None, stmt: Executable, params: dict[str, Any]) -> Any:
    """The first row of `stmt` (a mapping, or None): in `conn`'s transaction, or, without
    one, as a round trip of its own on PostgreSQL."""
    if conn is None:
        sql, own = _driver_sql(stmt)
        return round_trip(sql, {**own, **params})[1]
    return conn.execute(stmt, params).mappings().first()


def create_job(conn: Connection | None, kind: JobKind, **intent: Any) -> int:
    """plan() and insert, in `conn`'s transaction or (None, PostgreSQL only) as one round trip
    each, the insert committing on its own: the job's id (an existing job's, when its
    idempotency key and intent match)."""
    planned = plan(conn, kind, **intent)
    if planned.existing is not None:
        return planned.existing
    # The statement is built once; the row goes in as parameters (building `.values(...)`
    # per job cost more than the INSERT). A racing insert of the same key, or of a live job
    # for the session, loses here without aborting the transaction, and is told which it met.
    postgres = conn is None or conn.dialect.name == "postgresql"
    added = _first(conn, _INSERTS[postgres], row_values(planned.values))
    if added is not None:
        return added["id"]
    row = planned.values
    found = _first(conn, _HOLDER, {"account_id": row["account_id"], "idempotency_key": row["idempotency_key"]})
    if found is not None:
        same_intent_or_conflict(found["id"], found["kind"], found["session_id"], kind, row["session_id"])
        return found["id"]
    raise ConflictError(f"session {row['session_id']} already has a live {kind.value} writeback")
