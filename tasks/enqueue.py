"""The enqueue API the web tier calls.

The job row is written in the caller's transaction; the Celery message is published only
after that transaction commits (a message for a row that does not exist yet, or never will,
would be a lie). If the publish fails, the committed row is still there and the sweeper
publishes it: the row, not the message, is the promise.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import utcnow, AccountSettings, AiSession, JobKind, JobState, NoteVisibility, PsaConnection, WritebackJob
from models.db import after_outer_commit, session_scope
from providers import REGISTRY
from tasks import validation as v
from tasks.errors import ConflictError, NotFoundError, RequestError
from tasks.retry import RetryPolicy

log = logging.getLogger("psa_writeback.enqueue")

TASK_NAMES = {
    JobKind.RESOLVE: "writeback.resolve",
    JobKind.ESCALATE: "writeback.escalate",
    JobKind.POST_NOTE: "writeback.post_note",
    JobKind.TRANSITION_STATUS: "writeback.transition_status",
}
_NOTE_OF = {JobKind.RESOLVE: NoteVisibility.RESOLUTION, JobKind.ESCALATE: NoteVisibility.INTERNAL}
_PREF_SUFFIX = {JobKind.RESOLVE: "resolved_status_id", JobKind.ESCALATE: "escalated_status_id"}
_PENDING = "psa_writeback_pending_publish"


def enqueue_resolve(db: Session | None, session_id: int, markdown: str, **opts: Any) -> int:
    return enqueue(db, JobKind.RESOLVE, session_id=session_id, markdown=markdown, **opts)


def enqueue_escalate(db: Session | None, session_id: int, markdown: str, **opts: Any) -> int:
    return enqueue(db, JobKind.ESCALATE, session_id=session_id, markdown=markdown, **opts)


def enqueue_post_note(db: Session | None, session_id: int, markdown: str, visibility: str, **opts: Any) -> int:
    return enqueue(db, JobKind.POST_NOTE, session_id=session_id, markdown=markdown, visibility=visibility, **opts)


def enqueue_transition(db: Session | None, session_id: int, status_id: int, **opts: Any) -> int:
    return enqueue(db, JobKind.TRANSITION_STATUS, session_id=session_id, status_id=status_id, **opts)


def enqueue(db: Session | None, kind: JobKind | str, **intent: Any) -> int:
    """Validate, insert the job in `db`'s transaction, publish after commit; return the job id.

    With db=None the job gets its own short transaction. Raises RequestError (or its
    NotFoundError / ConflictError subclasses) and writes nothing when the input is wrong.
    """
    if db is None:
        with session_scope() as own:
            return enqueue(own, kind, **intent)
    job = build_job(db, v.kind(kind), **intent)
    if job.state == JobState.QUEUED.value and job.attempts == 0:
        publish_after_commit(db, job, fair_priority(db, job.account_id))
    return job.id


# --- fairness across tenants ----------------------------------------------------------------
# One FIFO would make a tenant's single Resolve wait behind another tenant's 5,000-job sweep.
# Redis serves a queue's priority lists in order (kombu's BRPOP names `writeback` first,
# then `writeback\x06\x163`, ...\x166, ...\x169: with Redis, 0 is the *highest*). So each
# message's priority comes from its tenant's live backlog when it is enqueued: an account's
# first few live jobs go to 0, a flood's later ones to 3, 6, 9. A quiet tenant's job is thus
# at most FAIR_STEPS[0] messages (per busy tenant) from the head of the queue, whatever the
# other tenants have queued. Order within a ticket is kept by the claim, not by the queue,
# and the row stays the promise: priority only decides which message a free thread takes.
FAIR_STEPS = ((8, 0), (64, 3), (512, 6))
FLOOD_PRIORITY = 9
# Messages we publish without a backlog count (the sweeper, the next job of a ticket): a
# middle step, behind every quiet tenant's new jobs, ahead of a flood's tail.
DEFAULT_PRIORITY = 3
_LIVE = [JobState.QUEUED.value, JobState.RETRYING.value, JobState.RUNNING.value]


def fair_priority(db: Session, account_id: int) -> int:
    """The broker priority for an account's next job: one indexed, bounded count (the
    partial index ix_writeback_jobs_account_live; it stops at the last step's size)."""
    limit = FAIR_STEPS[-1][0]
    live = select(WritebackJob.id).where(WritebackJob.account_id == account_id,
                                         WritebackJob.state.in_(_LIVE)).limit(limit).subquery()
    backlog = db.scalar(select(func.count()).select_from(live)) or 0
    return next((pri for size, pri in FAIR_STEPS if backlog <= size), FLOOD_PRIORITY)


def build_job(db: Session, kind: JobKind, *, session_id: Any, markdown: Any = None, visibility: Any = None,
              status_id: Any = None, idempotency_key: Any = None, psa_connection_id: Any = None,
              max_attempts: Any = None, account_id: Any = None) -> WritebackJob:
    """Validate the intent and add the job row (flushed, not committed). Returns an existing
    job when the same idempotency key was used before, by the same account, with the same
    intent. `account_id`, when given, is the web tier's guard: the session must be that
    account's."""
    session_id = v.positive_int(session_id, "session_id")
    key = v.idempotency_key(idempotency_key)
    session = _session(db, session_id, account_id)
    if key is not None and (existing := _by_key(db, session.account_id, key)):
        return _same_intent_or_conflict(existing, kind, session_id)
    job = WritebackJob(kind=kind.value, session_id=session.id, account_id=session.account_id, published_at=utcnow(),
                       idempotency_key=key or f"{kind.value}:{session.id}:{uuid.uuid4().hex}")
    job.max_attempts = (min(v.positive_int(max_attempts, "max_attempts"), 50) if max_attempts is not None
                        else RetryPolicy.from_env().max_attempts)
    if kind in (JobKind.RESOLVE, JobKind.ESCALATE, JobKind.POST_NOTE):
        job.markdown = v.markdown(markdown)
        job.note_visibility = (_NOTE_OF.get(kind) or v.visibility(visibility)).value
    elif markdown is not None or visibility is not None:
        raise RequestError("transition_status takes no markdown or visibility")
    connection = _connection(db, session, psa_connection_id)
    if kind in (JobKind.RESOLVE, JobKind.ESCALATE):
        _refuse_if_already_posted(db, session, kind)
    if connection is None:
        if kind in (JobKind.POST_NOTE, JobKind.TRANSITION_STATUS):
            raise RequestError(f"session {session.id} has no PSA linked: there is no ticket to write to",
                               field="session_id")
        job.ticket_key = f"session:{session.id}"
        return _insert(db, job, kind)
    if session.psa_ticket_id is None:
        raise RequestError(f"session {session.id} is linked to a PSA but has no ticket id", field="session_id")
    job.psa_connection_id, job.provider, job.ticket_id = connection.id, connection.provider, session.psa_ticket_id
    job.ticket_key = f"{connection.id}:{session.psa_ticket_id}"
    if kind is JobKind.TRANSITION_STATUS:
        job.target_status_id = v.positive_int(status_id, "status_id")
    elif status_id is not None:
        raise RequestError(f"{kind.value} takes its target status from the account's preferences, not status_id",
                           field="status_id")
    elif kind in _PREF_SUFFIX:
        job.target_status_id, job.transition_skipped_reason = target_status(db, session.account_id, connection.provider, kind)
    return _insert(db, job, kind)


def _session(db: Session, session_id: int, account_id: Any) -> AiSession:
    guard = v.positive_int(account_id, "account_id") if account_id is not None else None
    session = db.get(AiSession, session_id)
    if guard is not None and (session is None or session.account_id != guard):
        # One message whether the session is another tenant's or does not exist at all:
        # the caller learns nothing about other accounts' ids.
        raise NotFoundError(f"unknown session {session_id} for account {guard}", field="session_id")
    if session is None:
        raise NotFoundError(f"unknown session {session_id}", field="session_id")
    return session


def _by_key(db: Session, account_id: int, key: str) -> WritebackJob | None:
    # Keys are scoped per account: a tenant can neither see nor pre-empt another's keys.
    return db.scalar(select(WritebackJob).where(WritebackJob.account_id == account_id,
                                                WritebackJob.idempotency_key == key))


def target_status(db: Session, account_id: int, provider: str, kind: JobKind) -> tuple[int | None, str | None]:
    """The account's status for this kind, or (None, why not). Status ids are board-specific:
    we never guess a default."""
    pref_key = f"{REGISTRY[provider].preference_prefix}_{_PREF_SUFFIX[kind]}"
    settings = db.get(AccountSettings, account_id)
    value = (settings.preferences or {}).get(pref_key) if settings else None
    if value is None:
        return None, f"{pref_key} is not set in the account's preferences; the status was left unchanged"
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        log.warning("account %s preference %s is not a positive integer (%r); skipping the status change",
                    account_id, pref_key, type(value).__name__)
        return None, f"{pref_key} is set to a value that is not a positive integer ({str(value)[:40]!r}); " \
                     "treated as unset, the status was left unchanged"
    return value, None


def _connection(db: Session, session: AiSession, override: Any) -> PsaConnection | None:
    conn_id = v.positive_int(override, "psa_connection_id") if override is not None else session.psa_connection_id
    if conn_id is None:
        return None
    connection = db.get(PsaConnection, conn_id)
    if connection is None:
        raise NotFoundError(f"unknown PSA connection {conn_id}", field="psa_connection_id")
    if connection.account_id != session.account_id:
        raise RequestError(f"PSA connection {conn_id} belongs to another account than session {session.id}",
                           field="psa_connection_id")
    if not connection.is_active:
        raise RequestError(f"PSA connection {conn_id} is inactive", field="psa_connection_id")
    if connection.provider not in REGISTRY:
        raise RequestError(f"PSA connection {conn_id} uses unsupported provider {connection.provider!r}",
                           field="psa_connection_id")
    return connection


def _refuse_if_already_posted(db: Session, session: AiSession, kind: JobKind) -> None:
    posted = session.resolution_note_posted_at if kind is JobKind.RESOLVE else session.escalation_package_posted_at
    what = "resolution" if kind is JobKind.RESOLVE else "escalation package"
    if posted is not None:
        raise ConflictError(f"session {session.id}'s {what} was already posted at {posted.isoformat()}")
    live = db.scalar(select(WritebackJob.id).where(
        WritebackJob.session_id == session.id, WritebackJob.kind == kind.value,
        WritebackJob.state.notin_([JobState.FAILED.value, JobState.CANCELLED.value])))
    if live is not None:
        raise ConflictError(f"session {session.id} already has a {kind.value} writeback (job {live})")


def _insert(db: Session, job: WritebackJob, kind: JobKind) -> WritebackJob:
    try:
        with db.begin_nested():  # a race on the unique indexes rolls back this row only
            db.add(job)
    except IntegrityError:
        existing = _by_key(db, job.account_id, job.idempotency_key)
        if existing is not None:
            return _same_intent_or_conflict(existing, kind, job.session_id)
        raise ConflictError(f"session {job.session_id} already has a live {kind.value} writeback") from None
    return job


def _same_intent_or_conflict(existing: WritebackJob, kind: JobKind, session_id: int) -> WritebackJob:
    if existing.kind != kind.value or existing.session_id != session_id:
        raise ConflictError(f"idempotency_key was already used for job {existing.id} "
                            f"({existing.kind} of session {existing.session_id})", field="idempotency_key")
    return existing


# --- publish after commit -----------------------------------------------------------------

def publish_after_commit(db: Session, job: WritebackJob, priority: int | None = None) -> None:
    after_outer_commit(db, _PENDING, (job.id, job.kind, priority), _publish_all)


def _publish_all(pending: list[tuple[int, str, int | None]]) -> None:
    for job_id, kind, priority in pending:
        publish(job_id, kind, priority=priority)


def publish(job_id: int, kind: str, countdown: float | None = None, priority: int | None = None) -> bool:
    """Send "look at job N". A failure is logged, not raised: the sweeper re-publishes."""
    from worker.app import app

    try:
        app.send_task(TASK_NAMES[JobKind(kind)], kwargs={"job_id": job_id}, countdown=countdown,
                      queue="writeback", priority=DEFAULT_PRIORITY if priority is None else priority)
        return True
    except Exception as err:  # broker down: the committed row is the promise
        log.warning("publish of job %s failed (%s: %s); the sweeper will re-publish it", job_id, type(err).__name__, err)
        return False
