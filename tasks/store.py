"""The job row's transitions, each in its own short transaction.

Every write after the claim is guarded by `claimed_by = <this execution's token> AND
state = 'running'`: if our lease expired and another execution took the job, our late
writes change nothing and we stop (LeaseLost) instead of overwriting its progress.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, exists, func, or_, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, aliased

from models import (AccountSettings, AiSession, AttemptOutcome, JobState, NoteState, PsaConnection, WritebackAttempt,
                    WritebackJob, utcnow)
from models import crypto, settings
from models.crypto import ConfigurationError
from models.db import Row, get_engine, round_trip, session_scope, transaction
from models.enums import CLAIMABLE_STATES, TERMINAL_STATES
from models.jobs import ERROR_MESSAGE_LIMIT
from models.limits import clamp
from models.notify import JOB_CHANNEL, notify
from providers.base import Credentials
from providers.http import call_deadline, timeouts
from tasks import admin
from tasks.errors import LeaseLost

log = logging.getLogger("psa_writeback.store")

_TERMINAL = [s.value for s in TERMINAL_STATES]
_CLAIMABLE = [s.value for s in CLAIMABLE_STATES]
_CLAIMABLE_SQL = ", ".join(f"'{s}'" for s in _CLAIMABLE)  # for plain-SQL `state IN (...)`
# A retry message's ETA and our clock may disagree slightly; do not bounce it for that.
DUE_TOLERANCE = dt.timedelta(seconds=1)


def min_lease_seconds() -> float:
    """The shortest safe lease. A killed execution's POST can still land after the kill
    (the PSA keeps working on a request whose client is gone). The next execution may only
    reconcile once that POST had time to land, and it can only start once the lease has
    expired; the lease is renewed right before the POST, so it must outlast the POST, which
    the call deadline bounds (connect and every read, however slowly a server dribbles;
    default connect + read timeout), plus a read timeout as grace for a server still
    working on it, plus a second for the deadline watchdog's tick."""
    limits = timeouts()
    return call_deadline(limits) + limits[1] + 1


def lease_seconds() -> float:
    configured = settings.number("JOB_LEASE_SECONDS", 600, positive=True)
    floor = min_lease_seconds()
    if configured < floor:
        log.warning("JOB_LEASE_SECONDS=%s is shorter than a PSA call can take; using %.0f s", configured, floor)
    return max(configured, floor)


def transient_db_error(err: BaseException) -> bool:
    # pg_terminate_backend, failover, a dropped socket: the statement never ran or its
    # transaction rolled back, so running the same short transaction again is safe. (A
    # prepared statement gone from its connection is an OperationalError too: round_trip
    # forgot that connection's statements, so the next run prepares them again.)
    return isinstance(err, OperationalError) or (isinstance(err, DBAPIError) and err.connection_invalidated)


DB_ATTEMPTS = 6


def db_retry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` again after a transient database error (transient_db_error), at most
    DB_ATTEMPTS times in all, waiting 0.2, 0.4, 0.8, 1.6, 3.2 s in between (doubling, never
    more than 5 s); the last error is raised as it is. A plain loop, not tenacity: it wraps
    every transaction of the hot path, and tenacity's per-call bookkeeping (a copy of the
    Retrying object, its statistics and call state) cost a few percent of a worker's CPU
    per job at zero PSA latency."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, DB_ATTEMPTS + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if attempt == DB_ATTEMPTS or not transient_db_error(err):
                    raise
            time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        raise AssertionError("unreachable: the last attempt returns or raises")
    return wrapped


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    token: str
    attempt_no: int
    max_attempts: int
    session_id: int
    account_id: int
    provider: str | None
    connection_id: int | None
    ticket_id: int | None
    markdown: str | None
    note_visibility: str | None
    note_state: str
    note_baseline_ids: list[str]
    note_external_id: str | None
    target_status_id: int | None
    transition_skipped_reason: str | None
    credentials: Credentials | None
    # Why this job can never run as stored (connection deleted, deactivated, keys that no
    # longer decrypt): the runner fails it at once instead of retrying a setup problem.
    setup_error: str | None = None
    ticket_key: str | None = None
    started_at: dt.datetime | None = None  # the attempt row's start (None: read it back)
    note_watermark_id: str | None = None  # see WritebackJob.note_watermark_id
    options: dict[str, Any] = field(default_factory=dict)  # admin.options_from, read by the claim
    # Earlier executions our own limiter deferred (attempt outcome "deferred"), read by the
    # claim: they spent no attempt, and must not count in the backoff either.
    deferrals: int = 0
    # This execution's memory between its transactions: the note it posted (recorded with
    # the outcome), when it last renewed the lease, the next job of its ticket.
    scratch: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def failure_no(self) -> int:
        """Which real failure this execution would be if it failed (1-based): the attempt
        number without the deferrals before it. The backoff's exponent."""
        return max(self.attempt_no - self.deferrals, 1)


@dataclass(frozen=True)
class ClaimRefusal:
    reason: str  # missing | wrong_kind | terminal | running | not_due | blocked
    job_id: int
    state: str | None = None
    due_in: float = 0.0


# Durability, per transaction. PostgreSQL flushes its WAL to disk at every COMMIT, and for
# transactions this small that fsync is most of their cost. Only the note *intent* must be
# on disk before the network call it announces (record_note_intent keeps the default). The
# claim, the outcome and a retry's schedule commit with synchronous_commit = off: visible to
# everyone at once, on disk within ~3 x wal_writer_delay, lost only if PostgreSQL itself
# crashes in between. Losing them is safe: every write after the claim is fenced by the
# execution token, so a lost claim makes our intent write fail (LeaseLost) before any POST;
# a lost outcome leaves the job running on our lease, and the execution that takes it over
# afterwards reconciles the note (adopts it) and re-reads the status before any PATCH. And
# the WAL is one sequence: the intent's synchronous commit flushes the claim before it.
_RELAXED = "SET LOCAL synchronous_commit TO off"


# The hot path's transactions (claim, intent, outcome) run on a Core connection: an ORM
# Session's bookkeeping around three short transactions per job is CPU the worker can
# spend on jobs. The SQLite claim (the demo) adds an ORM object, so it keeps a Session.
DB = Session | Connection


def _postgres(db: DB | None = None) -> bool:
    bind = get_engine() if db is None else db if isinstance(db, Connection) else db.get_bind()
    return bind.dialect.name == "postgresql"


def _conn(db: DB) -> Connection:
    return db if isinstance(db, Connection) else db.connection()


def _relaxed(db: DB, then: str | None = None, params: dict[str, Any] | None = None) -> Any:
    """Relax this transaction's durability (PostgreSQL only), in the same round trip as
    `then` when given (psycopg2 sends both statements at once; the result is `then`'s)."""
    postgres = _postgres(db)
    if then is None:
        return db.execute(text(_RELAXED)) if postgres else None
    return db.execute(text(f"{_RELAXED}; {then}" if postgres else then), params or {})


_J = WritebackJob
_C = PsaConnection
_JOB_COLUMNS = (_J.id, _J.kind, _J.state, _J.attempts, _J.max_attempts, _J.session_id, _J.account_id, _J.provider,
                _J.psa_connection_id, _J.ticket_id, _J.ticket_key, _J.markdown, _J.note_visibility, _J.note_state,
                _J.note_baseline_ids, _J.note_watermark_id, _J.note_external_id, _J.target_status_id,
                _J.transition_skipped_reason,
                _J.claimed_by, _J.lease_until, _J.next_attempt_at)
_CONNECTION_COLUMNS = (_C.id.label("c_id"), _C.base_url.label("c_base_url"), _C.company_id.label("c_company_id"),
                       _C.client_id.label("c_client_id"), _C.public_key_encrypted.label("c_public"),
                       _C.private_key_encrypted.label("c_private"), _C.is_active.label("c_active"))


def _claim_prefix() -> str:
    """The PostgreSQL claim is one round trip: this prefix relaxes durability and takes the
    ticket's advisory lock; then _claim_statement, a statement of its own, so its snapshot
    is taken once the lock is held."""
    return f"""{_RELAXED};
SELECT pg_advisory_xact_lock(hashtext(ticket_key)) FROM writeback_jobs WHERE id = %(id)s;
"""


@functools.cache
def _claim_statement() -> str:
    """The claim itself, one statement (round_trip prepares it: its plan is reused): claim
    the row, open its attempt row, mark earlier attempts that never recorded an outcome
    abandoned, and read its connection. Plain SQL: building the same statement from
    SQLAlchemy constructs cost a quarter of a worker's CPU per job."""
    job_columns = ", ".join(f"j.{c.key}" for c in _JOB_COLUMNS)
    connection_columns = ", ".join(f"c.{c.element.key} AS {c.key}" for c in _CONNECTION_COLUMNS)
    terminal = ", ".join(f"'{s}'" for s in _TERMINAL)
    return f"""WITH claimed AS (
  UPDATE writeback_jobs AS j SET state = 'running', claimed_by = %(token)s, attempts = j.attempts + 1,
    lease_until = %(lease)s, started_at = coalesce(j.started_at, %(now)s), updated_at = %(now)s
  WHERE j.id = %(id)s AND (%(kind)s::varchar IS NULL OR j.kind = %(kind)s)
    AND ((j.state IN ({_CLAIMABLE_SQL}) AND j.next_attempt_at <= %(due)s)
         OR (j.state = 'running' AND j.lease_until < %(now)s))
    AND NOT EXISTS (SELECT 1 FROM writeback_jobs o WHERE o.ticket_key = j.ticket_key AND o.id <> j.id
                    AND ((o.id < j.id AND o.state NOT IN ({terminal}))
                         OR (o.state = 'running' AND o.lease_until > %(now)s)))
  RETURNING {job_columns}
), opened AS (
  INSERT INTO writeback_attempts (job_id, attempt_no, celery_task_id, worker, started_at, outcome)
  SELECT id, attempts, %(task_id)s, %(worker)s, %(now)s, 'running' FROM claimed
), abandoned AS (
  UPDATE writeback_attempts AS a SET outcome = '{AttemptOutcome.ABANDONED.value}', finished_at = %(now)s,
    error_message = %(abandoned)s
  FROM claimed WHERE a.job_id = claimed.id AND a.attempt_no < claimed.attempts
    AND a.outcome = '{AttemptOutcome.RUNNING.value}'
)
SELECT j.*, {connection_columns}, s.preferences, ({_DEFERRALS_SQL.format(job="j.id")}) AS deferrals
FROM claimed j LEFT JOIN psa_connections c ON c.id = j.psa_connection_id
LEFT JOIN account_settings s ON s.account_id = j.account_id"""


# Deferred executions of a job (a few rows on the job_id index), read in the claim's own
# statement: the backoff counts real failures only, without a query of its own.
_DEFERRALS_SQL = (f"SELECT count(*) FROM writeback_attempts a WHERE a.job_id = {{job}} "
                  f"AND a.outcome = '{AttemptOutcome.DEFERRED.value}'")


@db_retry
def claim(job_id: int | None, token: str, task_id: str | None, worker: str | None,
          kind: str | None = None, create: Callable[[Connection], int] | None = None,
          on_created: Callable[[int], None] | None = None) -> ClaimedJob | ClaimRefusal:
    """Claim job `job_id`; or, with `create`, first write the job (create(connection) returns
    its id: a task sent by name with the intent). Until the row is on disk it is the only
    promise of that writeback (the message is acked when the task ends), so it is never
    written in a relaxed commit (_RELAXED). On PostgreSQL create(None) writes it in round
    trips of its own (tasks.intake), committed durably before the claim, which then is any
    job's claim; a retry of this function finds the row by its idempotency key, and
    `on_created(job id)` is told once the row is committed, before the claim is tried. On
    SQLite (the demo) it is written in the claim's transaction, which then commits durably."""
    postgres = _postgres()
    if postgres:
        if create is not None:
            job_id = create(None)
            if on_created is not None:
                on_created(job_id)
        # the claim: one round trip, nothing else
        now, seconds = utcnow(), lease_seconds()
        row = round_trip(_claim_statement(), _claim_params(job_id, token, task_id, worker, kind, now, seconds),
                         prefix=_claim_prefix())[1]
        return _snapshot(row, token, started_at=now, lease=seconds) if row else _not_claimed(job_id, token, kind, now,
                                                                                            seconds)
    with session_scope() as db:
        if create is not None:
            job_id = create(_conn(db))
        # after create(): the new row's next_attempt_at is its insert time, which must be due
        now = utcnow()
        seconds = lease_seconds()
        row = _claim_portable(db, job_id, token, task_id, worker, kind, now, now + dt.timedelta(seconds=seconds))
        if row is None:
            return _not_claimed(job_id, token, kind, now, seconds, db)
        return _snapshot(row, token, started_at=now, lease=seconds)


_ABANDONED = "the execution stopped without recording an outcome (worker lost?)"


def _claim_params(job_id: int, token: str, task_id: str | None, worker: str | None, kind: str | None,
                  now: dt.datetime, seconds: float) -> dict[str, Any]:
    return {"id": job_id, "token": token, "lease": now + dt.timedelta(seconds=seconds), "now": now, "kind": kind,
            "due": now + DUE_TOLERANCE, "task_id": task_id, "worker": worker, "abandoned": _ABANDONED}


def _not_claimed(job_id: int, token: str, kind: str | None, now: dt.datetime, seconds: float,
                 db: DB | None = None) -> ClaimedJob | ClaimRefusal:
    """The claim matched no row: why not (a refusal), or ours already."""
    with _within(db) as db:
        row = _load(db, job_id)
    if row is not None and row.claimed_by == token and row.state == JobState.RUNNING.value:
        # db_retry ran us again after our commit landed but its reply was lost: the
        # claim (and its attempt row) is ours already; do not count a second attempt.
        return _snapshot(row, token, lease=seconds)
    return _refusal(row, job_id, now, kind)


def _claim_portable(db: Session, job_id: int, token: str, task_id: str | None, worker: str | None,
                    kind: str | None, now: dt.datetime, lease: dt.datetime) -> Any:
    """The same claim for SQLite (the demo): one writer at a time, so no lock is needed."""
    J, other = WritebackJob, aliased(WritebackJob)
    blocked = exists().where(other.ticket_key == J.ticket_key, other.id != J.id, or_(
        and_(other.id < J.id, other.state.notin_(_TERMINAL)),
        and_(other.state == JobState.RUNNING.value, other.lease_until > now)))
    claimable = or_(
        and_(J.state.in_(_CLAIMABLE), J.next_attempt_at <= now + DUE_TOLERANCE),
        and_(J.state == JobState.RUNNING.value, J.lease_until < now),
    )
    row = db.execute(update(J).where(J.id == job_id, J.kind == kind if kind else J.id == job_id, claimable, ~blocked)
                     .values(state=JobState.RUNNING.value, claimed_by=token, attempts=J.attempts + 1,
                             lease_until=lease, started_at=func.coalesce(J.started_at, now), updated_at=now)
                     .returning(J.attempts)).first()
    if row is None:
        return None
    # An execution that died mid-attempt never wrote its outcome: say so in the history.
    db.execute(update(WritebackAttempt).where(WritebackAttempt.job_id == job_id,
                                              WritebackAttempt.attempt_no < row.attempts,
                                              WritebackAttempt.outcome == AttemptOutcome.RUNNING.value)
               .values(outcome=AttemptOutcome.ABANDONED.value, finished_at=now, error_message=_ABANDONED))
    db.add(WritebackAttempt(job_id=job_id, attempt_no=row.attempts, celery_task_id=task_id, worker=worker,
                            started_at=now))
    db.flush()
    return _load(db, job_id)


@db_retry
def job_account(job_id: int) -> int | None:
    """The account job `job_id` belongs to (None: no such job): the tenant guard of a message
    that names its job (tasks.writeback), checked before the claim. On PostgreSQL one
    prepared round trip: a web tier that passes account_id pays it on every job."""
    if _postgres():
        row = round_trip("SELECT account_id FROM writeback_jobs WHERE id = %(id)s", {"id": job_id})[1]
        return row.account_id if row else None
    with session_scope() as db:
        return db.scalar(select(_J.account_id).where(_J.id == job_id))


def _load(db: DB, job_id: int) -> Any:
    A = WritebackAttempt
    deferrals = (select(func.count()).where(A.job_id == _J.id, A.outcome == AttemptOutcome.DEFERRED.value)
                 .scalar_subquery().label("deferrals"))
    return db.execute(select(*_JOB_COLUMNS, *_CONNECTION_COLUMNS, AccountSettings.preferences, deferrals)
                      .outerjoin(_C, _C.id == _J.psa_connection_id)
                      .outerjoin(AccountSettings, AccountSettings.account_id == _J.account_id)
                      .where(_J.id == job_id)).first()


# Decrypted keys, per connection, base URL and ciphertext (a re-keyed or rotated connection
# has new ciphertext, so a stale entry is never used; the URL is part of the key so a row
# repointed in the database misses the cache and meets the binding check), for a short
# while: Fernet's HMAC + AES per claim is measurable CPU at hundreds of jobs per second.
# Only in this process's memory.
_CREDENTIALS_TTL = 60.0
_credentials: dict[tuple[int, str | None, str], tuple[float, str, str]] = {}
_credentials_lock = threading.Lock()


def _keys(conn_id: int, base_url: str | None, public: bytes, private: bytes) -> tuple[str, str]:
    digest = hashlib.sha256(bytes(public) + b"|" + bytes(private)).hexdigest()
    now = time.monotonic()
    with _credentials_lock:
        hit = _credentials.get((conn_id, base_url, digest))
    if hit is not None and hit[0] > now:
        return hit[1], hit[2]
    # Each key was encrypted bound to its connection id and base URL (models.crypto).
    keys = (crypto.decrypt_bound(bytes(public), conn_id=conn_id, base_url=base_url),
            crypto.decrypt_bound(bytes(private), conn_id=conn_id, base_url=base_url))
    with _credentials_lock:
        if len(_credentials) > 1000:
            _credentials.clear()
        _credentials[(conn_id, base_url, digest)] = (now + _CREDENTIALS_TTL, *keys)
    return keys


def credentials_for(connection_id: int, c_id: int | None, c_active: bool | None, base_url: str | None,
                    company_id: str | None, client_id: str | None, public_enc: bytes | None,
                    private_enc: bytes | None) -> tuple[Credentials | None, str | None]:
    """A job's PSA credentials, or why it cannot use its connection (`connection_id`, the
    job's psa_connection_id): the connection row is gone (`c_id` None), deactivated, its
    keys no longer decrypt, or they were bound to another connection id or base URL (the
    row was changed in the database). Exactly one of the two is None."""
    if c_id is None:
        return None, f"PSA connection {connection_id} no longer exists"
    if not c_active:
        return None, f"PSA connection {connection_id} was deactivated after the job was enqueued"
    try:  # keys are decrypted in the worker (or the operator's CLI) only, never logged or stored
        public, private = _keys(c_id, base_url, public_enc, private_enc)
    except ConfigurationError as err:
        return None, str(err)
    return Credentials(base_url, company_id, client_id, public, private), None


def _snapshot(row: Any, token: str, started_at: dt.datetime | None = None, lease: float | None = None) -> ClaimedJob:
    creds, setup_error = None, None
    if row.psa_connection_id is not None:
        creds, setup_error = credentials_for(row.psa_connection_id, row.c_id, row.c_active, row.c_base_url,
                                             row.c_company_id, row.c_client_id, row.c_public, row.c_private)
    job = ClaimedJob(id=row.id, kind=row.kind, token=token, attempt_no=row.attempts, max_attempts=row.max_attempts,
                     session_id=row.session_id, account_id=row.account_id, provider=row.provider,
                     connection_id=row.psa_connection_id, ticket_id=row.ticket_id, markdown=row.markdown,
                     note_visibility=row.note_visibility, note_state=row.note_state,
                     note_baseline_ids=[str(i) for i in row.note_baseline_ids or []],
                     note_watermark_id=row.note_watermark_id,
                     note_external_id=row.note_external_id, target_status_id=row.target_status_id,
                     transition_skipped_reason=row.transition_skipped_reason, credentials=creds,
                     setup_error=setup_error, ticket_key=row.ticket_key, started_at=started_at,
                     deferrals=row.deferrals or 0,
                     options=admin.options_from(row.preferences, row.provider))
    job.scratch["lease_renewed"] = time.monotonic()
    if lease is not None:
        job.scratch["lease_seconds"] = lease
    return job


def job_lease_seconds(job: ClaimedJob) -> float:
    """The lease this execution was claimed with (lease_seconds() then): its renewals and its
    rate-limiter slot use the same length, without reading the settings again each time."""
    return job.scratch.get("lease_seconds") or lease_seconds()


def _refusal(job: Any, job_id: int, now: dt.datetime, kind: str | None) -> ClaimRefusal:
    if job is None:
        return ClaimRefusal("missing", job_id)
    if kind and job.kind != kind:
        return ClaimRefusal("wrong_kind", job_id, job.kind)
    if job.state in _TERMINAL:
        return ClaimRefusal("terminal", job_id, job.state)
    if job.state == JobState.RUNNING.value:
        # A live execution holds it; due_in says when its lease runs out, should it be dead.
        left = (job.lease_until - now).total_seconds() if job.lease_until else 0.0
        return ClaimRefusal("running", job_id, job.state, max(left, 0.0))
    if job.next_attempt_at > now + DUE_TOLERANCE:
        return ClaimRefusal("not_due", job_id, job.state, (job.next_attempt_at - now).total_seconds())
    return ClaimRefusal("blocked", job_id, job.state)


_UPDATE_SQL: dict[tuple[str, tuple[str, ...], str, str], str] = {}


def _portable(db: DB | None, values: dict[str, Any]) -> bool:
    """SQLAlchemy constructs for this write: not PostgreSQL, or SQL expressions as values."""
    return not _postgres(db) or any(
        hasattr(v, "__clause_element__") or hasattr(v, "_is_clause_element") for v in values.values())


def _update_sql(table: str, values: dict[str, Any], where: dict[str, Any], extra: str = "", p: str = "") -> str:
    """`UPDATE table SET values WHERE where (equalities) [AND extra]` as psycopg2 text, built
    once per column set; parameters are named p + v_/w_ + column (see _update_params)."""
    key = (table, tuple(values), ",".join(where) + "|" + extra, p)
    sql = _UPDATE_SQL.get(key)
    if sql is None:
        sets = ", ".join(f"{k} = %({p}v_{k})s" for k in values)
        conds = " AND ".join([f"{k} = %({p}w_{k})s" for k in where] + ([extra] if extra else []))
        sql = _UPDATE_SQL.setdefault(key, f"UPDATE {table} SET {sets} WHERE {conds}")
    return sql


def _update_params(values: dict[str, Any], where: dict[str, Any], p: str = "") -> dict[str, Any]:
    from psycopg2.extras import Json

    params = {f"{p}w_{k}": v for k, v in where.items()}
    params.update({f"{p}v_{k}": Json(v) if isinstance(v, (dict, list)) else v for k, v in values.items()})
    return params


def _update(db: DB | None, model: Any, where: dict[str, Any], values: dict[str, Any], extra: str = "") -> int:
    """UPDATE model SET values WHERE where (equalities) [AND extra]; returns the row count.
    On PostgreSQL the SQL text is built once per column set and sent as is: these updates
    run several times per job, and constructing them with SQLAlchemy cost more CPU than
    the rest of the job's database work. SQL expressions as values take the portable path.
    db=None (PostgreSQL, plain values): the update is a transaction of its own, one round trip."""
    table = model.__table__
    values = clamp(table, values)  # a vendor string too long for its column is stored cut
    if db is not None and _portable(db, values):
        stmt = update(model).where(*(table.c[k] == v for k, v in where.items()))
        if extra:
            stmt = stmt.where(text(extra))
        return db.execute(stmt.values(**values)).rowcount
    sql = _update_sql(table.name, values, where, extra)
    if db is None:
        return round_trip(sql, _update_params(values, where))[0]
    return _conn(db).exec_driver_sql(sql, _update_params(values, where)).rowcount


_OWNED = "state = 'running'"  # with claimed_by = the token: this execution still owns the job


def _guarded(db: DB | None, job: ClaimedJob, *, done_state: str | None = None, **values: Any) -> bool:
    """Update the job only while this execution owns it. Returns False (and changes nothing)
    when `done_state` is given and our own earlier commit of that state already landed: a
    db_retry after a reply lost on a killed connection must not count as losing the lease."""
    rowcount = _update(db, WritebackJob, {"id": job.id, "claimed_by": job.token}, {"updated_at": utcnow(), **values},
                       extra=_OWNED)
    return True if rowcount == 1 else _not_owned(db, job, done_state)


def _within(db: DB | None) -> contextlib.AbstractContextManager[DB]:
    """`db`'s transaction, or (None: the write before ran as its own round trip) a new one."""
    return contextlib.nullcontext(db) if db is not None else transaction()


def _guarded_alone(job: ClaimedJob, **values: Any) -> bool:
    """_guarded as a transaction of its own: one round trip on PostgreSQL (round_trip)."""
    if _postgres():
        return _guarded(None, job, **values)
    with transaction() as db:
        return _guarded(db, job, **values)


def _not_owned(db: DB | None, job: ClaimedJob, done_state: str | None) -> bool:
    """A guarded write changed nothing: our own earlier commit of `done_state` (False), or
    another execution owns the job now (LeaseLost)."""
    J = WritebackJob
    if done_state is not None:
        with _within(db) as db:
            current = db.execute(select(J.state, J.claimed_by).where(J.id == job.id)).first()
        if current is not None and current.claimed_by == job.token and current.state == done_state:
            return False
    raise LeaseLost(f"job {job.id}: another execution owns it now")


@db_retry
def renew_lease(job: ClaimedJob) -> None:
    """Called before each step: the lease counts from the start of the step's PSA calls."""
    _guarded_alone(job, lease_until=utcnow() + dt.timedelta(seconds=job_lease_seconds(job)))
    job.scratch["lease_renewed"] = time.monotonic()


def renew_lease_if_aged(job: ClaimedJob) -> bool:
    """Renew unless this execution renewed it (claim, note intent) within a tenth of the
    lease: the step then still has at least 90 % of a lease, and a job whose note went out
    a moment ago saves a transaction. Returns whether it wrote."""
    renewed = job.scratch.get("lease_renewed")
    if renewed is not None and time.monotonic() - renewed < 0.1 * job_lease_seconds(job):
        return False
    renew_lease(job)
    return True


@db_retry
def record_note_intent(job: ClaimedJob, baseline_ids: list[str], watermark_id: str | None = None) -> None:
    """Committed *before* every POST: from here on, a repeat must look for the note first.
    It renews the lease too, so a successor cannot start (and reconcile) until this POST
    has had its whole timeout, and more, to land."""
    # synchronous commit (the default): this one must be on disk before the POST
    _guarded_alone(job, note_state=NoteState.INTENT.value, note_baseline_ids=baseline_ids,
                   note_watermark_id=watermark_id, lease_until=utcnow() + dt.timedelta(seconds=job_lease_seconds(job)))
    job.scratch["lease_renewed"] = time.monotonic()


def record_note_posted(job: ClaimedJob, external_id: str, adopted: bool) -> dt.datetime:
    """Remember the posted (or adopted) note; it is written with this execution's outcome
    (finish or schedule_retry), in the same transaction. No commit of its own: if we die
    before the outcome lands, the committed intent makes the next execution find the note
    on the ticket and adopt it, exactly as when this write itself was lost."""
    now = utcnow()
    job.scratch["note"] = (external_id, adopted, now)
    return now


def _note_values(job: ClaimedJob) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job and session columns of a note this execution posted, if any."""
    if "note" not in job.scratch:
        return {}, {}
    external_id, adopted, at = job.scratch["note"]
    job_values = dict(note_state=NoteState.POSTED.value, note_external_id=external_id, note_posted_at=at,
                      note_adopted=adopted)
    columns = _session_note_columns(job.kind)
    session_values = {}
    if columns:
        md, posted_at, ext = columns
        session_values = {md: job.markdown, posted_at: at, ext: external_id}
    return job_values, session_values


def _session_note_columns(kind: str) -> tuple[str, str, str] | None:
    if kind == "resolve":
        return ("resolution_note_markdown", "resolution_note_posted_at", "resolution_note_external_id")
    if kind == "escalate":
        return ("escalation_package_markdown", "escalation_package_posted_at", "escalation_package_external_id")
    return None


@db_retry
def finish(job: ClaimedJob, state: JobState, outcome: AttemptOutcome, *, result: dict[str, Any],
           session_values: dict[str, Any] | None = None, error: BaseException | str | tuple[str, str] | None = None,
           http_status: int | None = None, step: str | None = None, record_session: bool = True,
           **job_values: Any) -> None:
    """The terminal write: job state + result, session columns, the attempt's outcome.
    Leaves the ticket's next live job in job.scratch["next"] ((id, kind) or None), read in
    the same transaction, also when our own earlier try had recorded the outcome already.
    record_session=False leaves the session's columns alone (a failure recorded after a
    database error, which may have been the session write itself)."""
    now = utcnow()
    note_job, note_session = _note_values(job)
    if not record_session:
        note_session, session_values = {}, None
    job_columns = {"updated_at": now, "state": state.value, "result": result, "finished_at": now, "lease_until": None,
                   **_error_columns(error), **note_job, **job_values}
    session_columns = {**note_session, **(session_values or {})}
    if session_columns:
        session_columns["updated_at"] = now
    if job.started_at is None or _portable(None, job_columns):
        with transaction() as db:
            nxt = _finish_portable(db, job, state, outcome, now, job_columns, session_columns, error, http_status, step)
    else:
        attempt_columns = _attempt_columns(job, outcome, now, error, http_status, step)
        nxt = _finish_pg(job, state, job_columns, session_columns, attempt_columns)
    job.scratch["next"] = nxt


def _finish_pg(job: ClaimedJob, state: JobState, job_columns: dict[str, Any],
               session_columns: dict[str, Any], attempt_columns: dict[str, Any]) -> tuple[int, str] | None:
    """finish() on PostgreSQL in one round trip (round_trip): relaxed durability (see _RELAXED), the
    guarded job update, the session and attempt updates only if that one matched, and the
    ticket's next live job. Returns that next job, (id, kind) or None, also when our own
    earlier try already recorded this outcome (then nothing is written)."""
    job_where, attempt_where = {"id": job.id, "claimed_by": job.token}, {"job_id": job.id, "attempt_no": job.attempt_no}
    # Vendor strings (status names, note ids) too long for their columns are stored cut:
    # an overflow here would fail the outcome of a job whose note and status both landed.
    job_columns = clamp(WritebackJob.__table__, job_columns)
    attempt_columns = clamp(WritebackAttempt.__table__, attempt_columns)
    session_columns = clamp(AiSession.__table__, session_columns)
    if_job = "EXISTS (SELECT 1 FROM j)"
    parts = [f"j AS ({_update_sql('writeback_jobs', job_columns, job_where, _OWNED, 'j')} RETURNING id)",
             f"a AS ({_update_sql('writeback_attempts', attempt_columns, attempt_where, if_job, 'a')})"]
    params = {**_update_params(job_columns, job_where, "j"), **_update_params(attempt_columns, attempt_where, "a"),
              "key": job.ticket_key, "id": job.id}
    if session_columns:
        where = {"id": job.session_id}
        parts.append(f"s AS ({_update_sql('ai_sessions', session_columns, where, if_job, 's')})")
        params.update(_update_params(session_columns, where, "s"))
    params["conn"] = job.connection_id
    row = round_trip(
        f"WITH {', '.join(parts)} SELECT (SELECT count(*) FROM j) AS updated, n.id, n.kind, "
        f"{_OPEN_ALERTS} AS open_alerts, {_NOTIFY_OUTCOME} AS notified "
        "FROM (SELECT 1) AS one LEFT JOIN LATERAL (SELECT id, kind FROM writeback_jobs "
        f"WHERE ticket_key = %(key)s AND id > %(id)s AND state IN ({_CLAIMABLE_SQL}) ORDER BY id LIMIT 1) AS n "
        "ON true", params, prefix=f"{_RELAXED}; ")[1]
    assert row is not None  # the statement always returns its one row
    nxt = (row.id, row.kind) if row.id is not None else None  # read by the same statement, matched or not
    if row.updated != 1:
        _not_owned(None, job, state.value)  # LeaseLost, unless our own earlier try recorded it
        return nxt
    job.scratch["open_alerts"] = row.open_alerts
    return nxt


# The web tier's waiters (tasks.outcome_wait) LISTEN for this: sent only if the guarded
# update matched, in the outcome's own round trip, and delivered by PostgreSQL on COMMIT.
_NOTIFY_OUTCOME = f"(SELECT pg_notify('{JOB_CHANNEL}', id::text) FROM j)"


# Whether an alert about this job, or an auth alert about its connection, is open: the
# operations hook that closes them on success (worker.alerts.resolve_on_finish) skips its
# UPDATE when none is, which is nearly always. Read in the outcome's own round trip.
_OPEN_ALERTS = ("(EXISTS (SELECT 1 FROM alerts WHERE job_id = %(id)s AND resolved_at IS NULL) OR "
                "EXISTS (SELECT 1 FROM alerts WHERE connection_id = %(conn)s AND kind = 'auth_failed' "
                "AND resolved_at IS NULL))")


def _finish_portable(db: DB, job: ClaimedJob, state: JobState, outcome: AttemptOutcome, now: dt.datetime,
                     job_columns: dict[str, Any], session_columns: dict[str, Any],
                     error: BaseException | str | tuple[str, str] | None, http_status: int | None,
                     step: str | None) -> tuple[int, str] | None:
    """The same as _finish_pg, a statement at a time (SQLite, or a claim retried after its
    reply was lost, whose attempt start has to be read back)."""
    row = _relaxed(db, "SELECT id, kind FROM writeback_jobs WHERE ticket_key = :key AND id > :id "
                       f"AND state IN ({_CLAIMABLE_SQL}) ORDER BY id LIMIT 1",
                   {"key": job.ticket_key, "id": job.id}).first()
    nxt = (row.id, row.kind) if row else None
    job_columns = {k: v for k, v in job_columns.items() if k != "updated_at"}
    if not _guarded(db, job, done_state=state.value, **job_columns):
        return nxt  # already recorded by our own earlier try (see _guarded)
    notify(db, JOB_CHANNEL, job.id)  # waiters of the web tier (a no-op on SQLite)
    if session_columns:
        _update(db, AiSession, {"id": job.session_id}, session_columns)
    _close_attempt(db, job, outcome, now, error, http_status, step)
    return nxt


@db_retry
def schedule_retry(job: ClaimedJob, delay: float, error: BaseException, http_status: int | None,
                   step: str | None, *, spend_attempt: bool = True, message: bool = True) -> dt.datetime:
    """Back to `retrying` at now + delay. spend_attempt=False (our own rate limiter said
    "not now") gives the attempt back by raising max_attempts: the row stays in the history,
    outcome "deferred" (which the next claim counts, so the backoff skips it too).
    (A literal, not `max_attempts + 1` in SQL: the row is fenced by our token, so the value
    we claimed is current, and a literal keeps the write on _update's prebuilt-SQL path.)
    message=False: no message will come for it at `due` (a job waiting for an in-flight slot,
    woken by a release): published_at is cleared, which tells the sweeper so."""
    now = utcnow()
    due = now + dt.timedelta(seconds=delay)
    note_job, note_session = _note_values(job)
    with transaction() as db:
        _relaxed(db)  # see _RELAXED: a lost retry schedule leaves the job on our lease
        if not _guarded(db, job, done_state=JobState.RETRYING.value, state=JobState.RETRYING.value,
                        next_attempt_at=due, lease_until=None, published_at=due if message else None,
                        **_error_columns(error),
                        **note_job, **({} if spend_attempt else {"max_attempts": job.max_attempts + 1})):
            return due
        if note_session:
            _update(db, AiSession, {"id": job.session_id}, {"updated_at": now, **note_session})
        _close_attempt(db, job, AttemptOutcome.RETRY if spend_attempt else AttemptOutcome.DEFERRED, now, error,
                       http_status, step)
    return due


@db_retry
def wake(job_id: int) -> str | None:
    """A job waiting for an in-flight slot was handed one (ratelimit.release): due now, and
    marked published (the waker publishes it next, so the sweeper need not). Returns its kind,
    or None when it is not waiting any more (finished, running, deleted)."""
    now = utcnow()
    with transaction() as db:
        _relaxed(db)  # lost in a PostgreSQL crash: the job comes back at its recheck instead
        row = db.execute(update(_J).where(_J.id == job_id, _J.state.in_(_CLAIMABLE))
                         .values(next_attempt_at=now, published_at=now, updated_at=now)
                         .returning(_J.kind)).first()
    return None if row is None else row.kind


def _error_columns(error: BaseException | str | tuple[str, str] | None) -> dict[str, Any]:
    """An exception, a bare message, or (error type, message) when the message is ours."""
    if error is None:
        return {"error_type": None, "error_message": None}
    if isinstance(error, tuple):
        return {"error_type": error[0], "error_message": error[1][:ERROR_MESSAGE_LIMIT]}
    if isinstance(error, str):
        return {"error_type": "error", "error_message": error[:ERROR_MESSAGE_LIMIT]}
    return {"error_type": type(error).__name__, "error_message": str(error)[:ERROR_MESSAGE_LIMIT]}


def _attempt_columns(job: ClaimedJob, outcome: AttemptOutcome, now: dt.datetime,
                     error: BaseException | str | tuple[str, str] | None, http_status: int | None,
                     step: str | None, started: dt.datetime | None = None) -> dict[str, Any]:
    started = started or job.started_at
    duration = int((now - started).total_seconds() * 1000) if started else None
    psa = job.scratch.get("psa_seconds")
    return dict(outcome=outcome.value, finished_at=now, duration_ms=duration, http_status=http_status, step=step,
                psa_ms=None if psa is None else int(psa * 1000), **_error_columns(error))


def _close_attempt(db: DB, job: ClaimedJob, outcome: AttemptOutcome, now: dt.datetime,
                   error: BaseException | str | tuple[str, str] | None, http_status: int | None,
                   step: str | None) -> None:
    A = WritebackAttempt
    started = job.started_at or db.scalar(select(A.started_at).where(A.job_id == job.id,
                                                                     A.attempt_no == job.attempt_no))
    _update(db, A, {"job_id": job.id, "attempt_no": job.attempt_no},
            _attempt_columns(job, outcome, now, error, http_status, step, started))


@db_retry
def next_on_ticket(job_id: int) -> tuple[int, str] | None:
    """The earliest live job queued behind this one on the same ticket, to publish now
    rather than wait for the sweeper."""
    with session_scope() as db:
        J = WritebackJob
        key = db.scalar(select(J.ticket_key).where(J.id == job_id))
        row = db.execute(select(J.id, J.kind).where(J.ticket_key == key, J.id > job_id, J.state.in_(_CLAIMABLE))
                         .order_by(J.id).limit(1)).first()
        return (row.id, row.kind) if row else None
