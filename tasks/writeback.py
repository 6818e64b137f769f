"""Celery tasks: thin wrappers that map a job execution onto Celery's vocabulary.

Task names are a contract with the web tier (see README "Task contract"):
  writeback.resolve / writeback.escalate / writeback.post_note / writeback.transition_status
take either {"job_id": N} (what the enqueue API publishes) or the intent itself as keyword
arguments, and writeback.sweep is the beat-driven re-publisher.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject

from models import JobKind
from models.db import session_scope
from tasks import runner, store, sweeper
from tasks import validation as v
from tasks.enqueue import build_job, publish
from tasks.errors import JobFailed, RequestError, VerificationFailed
from worker.app import app

log = logging.getLogger("psa_writeback.tasks")

# Never publish a countdown close to the broker's visibility timeout (7200 s): Redis would
# redeliver the waiting message early as a duplicate. Longer waits are the sweeper's job.
MAX_COUNTDOWN = 1800

_INTENT_FIELDS = {
    JobKind.RESOLVE: ({"session_id", "markdown", "idempotency_key", "psa_connection_id", "max_attempts"},
                      {"session_id", "markdown"}),
    JobKind.ESCALATE: ({"session_id", "markdown", "idempotency_key", "psa_connection_id", "max_attempts"},
                       {"session_id", "markdown"}),
    JobKind.POST_NOTE: ({"session_id", "markdown", "visibility", "idempotency_key", "psa_connection_id",
                         "max_attempts"}, {"session_id", "markdown", "visibility"}),
    JobKind.TRANSITION_STATUS: ({"session_id", "status_id", "idempotency_key", "psa_connection_id", "max_attempts"},
                                {"session_id", "status_id"}),
}


class InvalidTaskArguments(RequestError):
    """The message's arguments are wrong: nothing was written; the task fails at once."""


def _job_from_intent(task: Task, kind: JobKind, intent: dict[str, Any]) -> int:
    allowed, required = _INTENT_FIELDS[kind]
    payload = dict(v.only_known(intent, allowed, required))
    # A redelivered message must find the job its first delivery created, not make another.
    payload["idempotency_key"] = payload.get("idempotency_key") or f"celery:{task.request.id}"
    with session_scope() as db:
        job = build_job(db, kind, **payload)
        db.flush()
        return job.id


def run_job(task: Task, kind: JobKind, job_id: Any, intent: dict[str, Any]) -> dict[str, Any]:
    try:
        if job_id is None:
            job_id = _job_from_intent(task, kind, intent)
        else:
            if intent:
                raise RequestError(f"pass either job_id or the intent, not both (got {', '.join(sorted(intent))})")
            job_id = v.positive_int(job_id, "job_id")
    except RequestError as err:
        raise InvalidTaskArguments(f"{task.name}: {err.message}", field=err.field) from None
    outcome = runner.execute(job_id, task.request.id, task.request.hostname, kind=kind.value)
    if outcome.status == "retry" or (outcome.status == "skipped" and outcome.delay > 0):
        # The job row already holds next_attempt_at; this message is just the wake-up call.
        raise task.retry(countdown=min(outcome.delay, MAX_COUNTDOWN), max_retries=None)
    if outcome.status in ("succeeded", "verification_failed", "failed"):
        _wake_next_on_ticket(job_id)
    if outcome.status == "failed":
        raise JobFailed(f"job {job_id} failed: {outcome.message}")
    if outcome.status == "verification_failed":
        raise VerificationFailed(f"job {job_id}: {outcome.message}")
    if outcome.result.get("refused") == "wrong_kind":
        raise Reject(f"job {job_id}: {outcome.message}", requeue=False)
    return {"job_id": job_id, "state": outcome.status, "outcome": outcome.result.get("outcome"),
            "detail": outcome.message or None}


def _wake_next_on_ticket(job_id: int) -> None:
    nxt = store.next_on_ticket(job_id)
    if nxt is not None:
        publish(*nxt)


_TASK_OPTIONS = dict(bind=True, max_retries=None, acks_late=True, throws=(JobFailed, VerificationFailed))


@app.task(name="writeback.resolve", **_TASK_OPTIONS)
def resolve(self: Task, job_id: int | None = None, **intent: Any) -> dict[str, Any]:
    """Post a customer-visible resolution note, then move the ticket to the resolved status."""
    return run_job(self, JobKind.RESOLVE, job_id, intent)


@app.task(name="writeback.escalate", **_TASK_OPTIONS)
def escalate(self: Task, job_id: int | None = None, **intent: Any) -> dict[str, Any]:
    """Post an internal-only handoff note, then move the ticket to the escalated status."""
    return run_job(self, JobKind.ESCALATE, job_id, intent)


@app.task(name="writeback.post_note", **_TASK_OPTIONS)
def post_note(self: Task, job_id: int | None = None, **intent: Any) -> dict[str, Any]:
    return run_job(self, JobKind.POST_NOTE, job_id, intent)


@app.task(name="writeback.transition_status", **_TASK_OPTIONS)
def transition_status(self: Task, job_id: int | None = None, **intent: Any) -> dict[str, Any]:
    return run_job(self, JobKind.TRANSITION_STATUS, job_id, intent)


@app.task(name="writeback.sweep", acks_late=False)
def sweep() -> dict[str, int]:
    return sweeper.sweep()
