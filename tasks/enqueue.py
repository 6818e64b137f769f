"""The enqueue API the web tier calls.

The job row is written in the caller's transaction; the Celery message is published only
after that transaction commits (a message for a row that does not exist yet, or never will,
would be a lie). If the publish fails, the committed row is still there and the sweeper
publishes it: the row, not the message, is the promise.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import JobKind, JobState, WritebackJob
from models.db import after_outer_commit, session_scope
from tasks import intake
from tasks import validation as v

log = logging.getLogger("psa_writeback.enqueue")

TASK_NAMES = {
    JobKind.RESOLVE: "writeback.resolve",
    JobKind.ESCALATE: "writeback.escalate",
    JobKind.POST_NOTE: "writeback.post_note",
    JobKind.TRANSITION_STATUS: "writeback.transition_status",
}
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


def build_job(db: Session, kind: JobKind, **intent: Any) -> WritebackJob:
    """Validate the intent and write the job row in `db`'s transaction (not committed):
    tasks.intake.create_job, the same checks and insert as a task sent by name. Returns the
    existing job when the same idempotency key was used before, by the same account, with the
    same intent. `account_id`, when given, is the web tier's guard: the session must be that
    account's."""
    db.flush()  # the caller's pending rows (a session just added) are facts the checks read
    return db.get(WritebackJob, intake.create_job(db.connection(), kind, **intent))


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
