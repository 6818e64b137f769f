"""The job row's transitions, each in its own short transaction.

Every write after the claim is guarded by `claimed_by = <this execution's token> AND
state = 'running'`: if our lease expired and another execution took the job, our late
writes change nothing and we stop (LeaseLost) instead of overwriting its progress.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, aliased
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from models import (AiSession, AttemptOutcome, JobState, NoteState, PsaConnection, WritebackAttempt,
                    WritebackJob, utcnow)
from models import crypto
from models.crypto import ConfigurationError
from models.db import session_scope
from models.enums import CLAIMABLE_STATES, TERMINAL_STATES
from models.jobs import ERROR_MESSAGE_LIMIT
from providers.base import Credentials
from providers.http import timeouts
from tasks.errors import LeaseLost

log = logging.getLogger("psa_writeback.store")

_TERMINAL = [s.value for s in TERMINAL_STATES]
_CLAIMABLE = [s.value for s in CLAIMABLE_STATES]
# A retry message's ETA and our clock may disagree slightly; do not bounce it for that.
DUE_TOLERANCE = dt.timedelta(seconds=1)


def min_lease_seconds() -> float:
    """The shortest safe lease. A killed execution's POST can still land after the kill
    (the PSA keeps working on a request whose client is gone). The next execution may only
    reconcile once that POST had time to land, and it can only start once the lease has
    expired; the lease is renewed right before the POST, so it must outlast the POST's
    connect + read timeout plus the same again as grace for a server still working on it."""
    connect, read = timeouts()
    return connect + 2 * read + 1


def lease_seconds() -> float:
    configured = float(os.environ.get("JOB_LEASE_SECONDS", "600"))
    floor = min_lease_seconds()
    if configured < floor:
        log.warning("JOB_LEASE_SECONDS=%s is shorter than a PSA call can take; using %.0f s", configured, floor)
    return max(configured, floor)


def transient_db_error(err: BaseException) -> bool:
    # pg_terminate_backend, failover, a dropped socket: the statement never ran or its
    # transaction rolled back, so running the same short transaction again is safe.
    return isinstance(err, OperationalError) or (isinstance(err, DBAPIError) and err.connection_invalidated)


db_retry = retry(retry=retry_if_exception(transient_db_error), stop=stop_after_attempt(6),
                 wait=wait_exponential(multiplier=0.2, max=5), reraise=True)


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


@dataclass(frozen=True)
class ClaimRefusal:
    reason: str  # missing | wrong_kind | terminal | running | not_due | blocked
    job_id: int
    state: str | None = None
    due_in: float = 0.0


@db_retry
def claim(job_id: int, token: str, task_id: str | None, worker: str | None,
          kind: str | None = None) -> ClaimedJob | ClaimRefusal:
    now = utcnow()
    with session_scope() as db:
        if db.get_bind().dialect.name == "postgresql":
            # Serialise claims per ticket: two jobs of one ticket must never both pass the
            # "no earlier job is live" test below in concurrent transactions.
            db.execute(text("SELECT pg_advisory_xact_lock(hashtext(ticket_key)) FROM writeback_jobs WHERE id = :id"),
                       {"id": job_id})
        J, other = WritebackJob, aliased(WritebackJob)
        blocked = exists().where(other.ticket_key == J.ticket_key, other.id != J.id, or_(
            and_(other.id < J.id, other.state.notin_(_TERMINAL)),
            and_(other.state == JobState.RUNNING.value, other.lease_until > now)))
        claimable = or_(
            and_(J.state.in_(_CLAIMABLE), J.next_attempt_at <= now + DUE_TOLERANCE),
            and_(J.state == JobState.RUNNING.value, J.lease_until < now),
        )
        row = db.execute(
            update(J).where(J.id == job_id, J.kind == kind if kind else J.id == job_id, claimable, ~blocked)
            .values(state=JobState.RUNNING.value, claimed_by=token, attempts=J.attempts + 1,
                    lease_until=now + dt.timedelta(seconds=lease_seconds()),
                    started_at=func.coalesce(J.started_at, now), updated_at=now)
            .returning(J.attempts)
        ).first()
        job = db.execute(select(J).where(J.id == job_id).execution_options(populate_existing=True)).scalar_one_or_none()
        if row is None:
            if job is not None and job.claimed_by == token and job.state == JobState.RUNNING.value:
                # db_retry ran us again after our commit landed but its reply was lost: the
                # claim (and its attempt row) is ours already; do not count a second attempt.
                return _snapshot(db, job, token)
            return _refusal(job, job_id, now, kind)
        # An execution that died mid-attempt never wrote its outcome: say so in the history.
        db.execute(update(WritebackAttempt).where(WritebackAttempt.job_id == job_id,
                                                  WritebackAttempt.outcome == AttemptOutcome.RUNNING.value)
                   .values(outcome=AttemptOutcome.ABANDONED.value, finished_at=now,
                           error_message="the execution stopped without recording an outcome (worker lost?)"))
        db.add(WritebackAttempt(job_id=job_id, attempt_no=job.attempts, celery_task_id=task_id, worker=worker,
                                started_at=now))
        return _snapshot(db, job, token)


def _snapshot(db: Session, job: WritebackJob, token: str) -> ClaimedJob:
    creds, setup_error = None, None
    if job.psa_connection_id is not None:
        connection = db.get(PsaConnection, job.psa_connection_id)
        if connection is None:
            setup_error = f"PSA connection {job.psa_connection_id} no longer exists"
        elif not connection.is_active:
            setup_error = f"PSA connection {job.psa_connection_id} was deactivated after the job was enqueued"
        else:
            try:  # keys are decrypted in the worker only, never logged, never stored elsewhere
                creds = Credentials(connection.base_url, connection.company_id, connection.client_id,
                                    crypto.decrypt(connection.public_key_encrypted),
                                    crypto.decrypt(connection.private_key_encrypted))
            except ConfigurationError as err:
                setup_error = str(err)
    return ClaimedJob(id=job.id, kind=job.kind, token=token, attempt_no=job.attempts, max_attempts=job.max_attempts,
                      session_id=job.session_id, account_id=job.account_id, provider=job.provider,
                      connection_id=job.psa_connection_id, ticket_id=job.ticket_id, markdown=job.markdown,
                      note_visibility=job.note_visibility, note_state=job.note_state,
                      note_baseline_ids=[str(i) for i in job.note_baseline_ids or []],
                      note_external_id=job.note_external_id, target_status_id=job.target_status_id,
                      transition_skipped_reason=job.transition_skipped_reason, credentials=creds,
                      setup_error=setup_error)


def _refusal(job: WritebackJob | None, job_id: int, now: dt.datetime, kind: str | None) -> ClaimRefusal:
    if job is None:
        return ClaimRefusal("missing", job_id)
    if kind and job.kind != kind:
        return ClaimRefusal("wrong_kind", job_id, job.kind)
    if job.state in _TERMINAL:
        return ClaimRefusal("terminal", job_id, job.state)
    if job.state == JobState.RUNNING.value:
        # A live execution holds it; due_in says when its lease runs out, should it be dead.
        left = (_aware(job.lease_until) - now).total_seconds() if job.lease_until else 0.0
        return ClaimRefusal("running", job_id, job.state, max(left, 0.0))
    if _aware(job.next_attempt_at) > now + DUE_TOLERANCE:
        return ClaimRefusal("not_due", job_id, job.state, (_aware(job.next_attempt_at) - now).total_seconds())
    return ClaimRefusal("blocked", job_id, job.state)


def _guarded(db: Session, job: ClaimedJob, *, done_state: str | None = None, **values: Any) -> bool:
    """Update the job only while this execution owns it. Returns False (and changes nothing)
    when `done_state` is given and our own earlier commit of that state already landed: a
    db_retry after a reply lost on a killed connection must not count as losing the lease."""
    J = WritebackJob
    res = db.execute(update(J).where(J.id == job.id, J.claimed_by == job.token, J.state == JobState.RUNNING.value)
                     .values(updated_at=utcnow(), **values))
    if res.rowcount == 1:
        return True
    if done_state is not None:
        current = db.execute(select(J.state, J.claimed_by).where(J.id == job.id)).first()
        if current is not None and current.claimed_by == job.token and current.state == done_state:
            return False
    raise LeaseLost(f"job {job.id}: another execution owns it now")


@db_retry
def renew_lease(job: ClaimedJob) -> None:
    """Called before each step: the lease counts from the start of the step's PSA calls."""
    with session_scope() as db:
        _guarded(db, job, lease_until=utcnow() + dt.timedelta(seconds=lease_seconds()))


@db_retry
def record_note_intent(job: ClaimedJob, baseline_ids: list[str]) -> None:
    """Committed *before* every POST: from here on, a repeat must look for the note first.
    It renews the lease too, so a successor cannot start (and reconcile) until this POST
    has had its whole timeout, and more, to land."""
    with session_scope() as db:
        _guarded(db, job, note_state=NoteState.INTENT.value, note_baseline_ids=baseline_ids,
                 lease_until=utcnow() + dt.timedelta(seconds=lease_seconds()))


@db_retry
def record_note_posted(job: ClaimedJob, external_id: str, adopted: bool) -> dt.datetime:
    now = utcnow()
    with session_scope() as db:
        _guarded(db, job, note_state=NoteState.POSTED.value, note_external_id=external_id, note_posted_at=now,
                 note_adopted=adopted)
        columns = _session_note_columns(job.kind)
        if columns:
            md, at, ext = columns
            db.execute(update(AiSession).where(AiSession.id == job.session_id)
                       .values({md: job.markdown, at: now, ext: external_id, "updated_at": now}))
    return now


def _session_note_columns(kind: str) -> tuple[str, str, str] | None:
    if kind == "resolve":
        return ("resolution_note_markdown", "resolution_note_posted_at", "resolution_note_external_id")
    if kind == "escalate":
        return ("escalation_package_markdown", "escalation_package_posted_at", "escalation_package_external_id")
    return None


@db_retry
def finish(job: ClaimedJob, state: JobState, outcome: AttemptOutcome, *, result: dict[str, Any],
           session_values: dict[str, Any] | None = None, error: BaseException | str | tuple[str, str] | None = None,
           http_status: int | None = None, step: str | None = None, **job_values: Any) -> None:
    """The terminal write: job state + result, session columns, the attempt's outcome."""
    now = utcnow()
    with session_scope() as db:
        if not _guarded(db, job, done_state=state.value, state=state.value, result=result, finished_at=now,
                        lease_until=None, **_error_columns(error), **job_values):
            return  # already recorded by our own earlier try (see _guarded)
        if session_values:
            db.execute(update(AiSession).where(AiSession.id == job.session_id)
                       .values(updated_at=now, **session_values))
        _close_attempt(db, job, outcome, now, error, http_status, step)


@db_retry
def schedule_retry(job: ClaimedJob, delay: float, error: BaseException, http_status: int | None,
                   step: str | None) -> dt.datetime:
    now = utcnow()
    due = now + dt.timedelta(seconds=delay)
    with session_scope() as db:
        if not _guarded(db, job, done_state=JobState.RETRYING.value, state=JobState.RETRYING.value,
                        next_attempt_at=due, lease_until=None, published_at=due, **_error_columns(error)):
            return due
        _close_attempt(db, job, AttemptOutcome.RETRY, now, error, http_status, step)
    return due


def _error_columns(error: BaseException | str | tuple[str, str] | None) -> dict[str, Any]:
    """An exception, a bare message, or (error type, message) when the message is ours."""
    if error is None:
        return {"error_type": None, "error_message": None}
    if isinstance(error, tuple):
        return {"error_type": error[0], "error_message": error[1][:ERROR_MESSAGE_LIMIT]}
    if isinstance(error, str):
        return {"error_type": "error", "error_message": error[:ERROR_MESSAGE_LIMIT]}
    return {"error_type": type(error).__name__, "error_message": str(error)[:ERROR_MESSAGE_LIMIT]}


def _close_attempt(db: Session, job: ClaimedJob, outcome: AttemptOutcome, now: dt.datetime,
                   error: BaseException | str | tuple[str, str] | None, http_status: int | None,
                   step: str | None) -> None:
    A = WritebackAttempt
    started = db.scalar(select(A.started_at).where(A.job_id == job.id, A.attempt_no == job.attempt_no))
    duration = int((now - _aware(started)).total_seconds() * 1000) if started else None
    db.execute(update(A).where(A.job_id == job.id, A.attempt_no == job.attempt_no)
               .values(outcome=outcome.value, finished_at=now, duration_ms=duration, http_status=http_status,
                       step=step, **_error_columns(error)))


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes even for timezone=True columns.
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


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
