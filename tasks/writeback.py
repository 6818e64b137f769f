"""Celery tasks: thin wrappers that map a job execution onto Celery's vocabulary.

Task names are a contract with the web tier (see README "Task contract"):
  writeback.resolve / writeback.escalate / writeback.post_note / writeback.transition_status
take either {"job_id": N} (what the enqueue API publishes) or the intent itself as keyword
arguments, and writeback.sweep is the beat-driven re-publisher.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery import Task
from sqlalchemy import Connection

from models import JobKind, settings
from models.db import describe_error
from tasks import runner, store, sweeper
from tasks import validation as v
from tasks.enqueue import publish
from tasks.intake import create_job
from tasks.errors import DatabaseUnavailable, JobFailed, PoisonMessage, RequestError, VerificationFailed
from worker.app import app

log = logging.getLogger("psa_writeback.tasks")

# A message waiting out a countdown is "unacked" at Redis from the moment the worker takes
# it; past the visibility timeout Redis hands out a second copy. Keep every countdown well
# under it; longer waits are the sweeper's job (the row holds next_attempt_at).
MAX_COUNTDOWN = 1800.0


def max_countdown() -> float:
    visibility = (app.conf.broker_transport_options or {}).get("visibility_timeout") or 3600
    return max(1.0, min(MAX_COUNTDOWN, float(visibility) / 2))


def db_outage_countdown() -> float:
    return settings.number("DB_OUTAGE_RETRY_SECONDS", 10, minimum=0)


# `account_id` (optional, every kind) is the web tier's tenant guard: when given, a session
# (or job) of another account is refused. Anyone who can write to Redis can send a task.
_COMMON = {"idempotency_key", "psa_connection_id", "max_attempts", "account_id"}
_INTENT_FIELDS = {
    JobKind.RESOLVE: ({"session_id", "markdown", *_COMMON}, {"session_id", "markdown"}),
    JobKind.ESCALATE: ({"session_id", "markdown", *_COMMON}, {"session_id", "markdown"}),
    JobKind.POST_NOTE: ({"session_id", "markdown", "visibility", *_COMMON}, {"session_id", "markdown", "visibility"}),
    JobKind.TRANSITION_STATUS: ({"session_id", "status_id", *_COMMON}, {"session_id", "status_id"}),
}


class InvalidTaskArguments(RequestError):
    """The message's arguments are wrong: nothing was written; the task fails at once."""


def _job_from_intent(task: Task, kind: JobKind, intent: dict[str, Any]) -> Callable[[Connection], int]:
    """What writes the job for this intent: store.claim runs it just before the claim (on
    PostgreSQL as two round trips of its own, on SQLite in the claim's transaction)."""
    allowed, required = _INTENT_FIELDS[kind]
    payload = dict(v.only_known(intent, allowed, required))
    # A redelivered message must find the job its first delivery created, not make another.
    payload["idempotency_key"] = payload.get("idempotency_key") or f"celery:{task.request.id}"
    return functools.partial(create_job, kind=kind, **payload)


def run_job(task: Task, kind: JobKind, args: tuple[Any, ...], job_id: Any, intent: dict[str, Any]) -> dict[str, Any]:
    # The job a retry message should name: known once a job sent by name is committed (on
    # PostgreSQL before its claim, on SQLite with it), so a retry never carries the markdown
    # again. One before that carries the intent: nothing was written, or its task id keys it.
    known: list[int] = []
    try:
        job_id, create = _job_id(task, kind, args, job_id, intent)
        if job_id is not None:
            known.append(job_id)
        outcome = runner.execute(job_id, task.request.id, task.request.hostname, kind=kind.value, create=create,
                                 on_claim=known.append)
        job_id = outcome.job_id
    except RequestError as err:
        # Wrong arguments: nothing was written, and repeating the message cannot help.
        raise InvalidTaskArguments(f"{task.name}: {err.message}", field=err.field) from None
    except Exception as err:
        if not store.transient_db_error(err):
            raise
        # The database is unreachable (db_retry already waited): come back later. Whatever
        # this execution had claimed stays leased, so the retry (or the sweeper) resumes it.
        log.warning("database unavailable for %s (%s); retrying the message", task.name, describe_error(err))
        ids_only = {"args": (), "kwargs": {"job_id": known[-1]}} if known else {}
        # The retry's reason (logged, and shown by Flower) names the error, never its text.
        raise task.retry(countdown=min(db_outage_countdown(), max_countdown()), max_retries=None,
                         exc=DatabaseUnavailable(describe_error(err)), **ids_only) from None
    refused = outcome.result.get("refused")
    if refused == "missing":
        raise PoisonMessage(f"job {job_id} does not exist (deleted after it was published?); nothing to do")
    if refused == "wrong_kind":
        raise PoisonMessage(f"job {job_id}: {outcome.message}")
    if outcome.status == "retry" or (outcome.status == "skipped" and outcome.delay > 0):
        # The job row already holds next_attempt_at (or a live lease): this message is just
        # the wake-up call. A "running" refusal wakes up when that lease would run out, so a
        # job whose worker died resumes without waiting for the sweeper.
        # The retry carries only the job id: a by-name intent's markdown never travels twice.
        raise task.retry(args=(), kwargs={"job_id": job_id},
                         countdown=min(outcome.delay + (0.5 if refused == "running" else 0), max_countdown()),
                         max_retries=None)
    # "waiting" (for a PSA connection's in-flight slot) ends the message: the job waits in
    # the connection's waiting set, and the job that frees a slot publishes it (runner._wake).
    if outcome.status in ("succeeded", "verification_failed", "failed") and outcome.next_on_ticket is not None:
        publish(*outcome.next_on_ticket)  # looked up in the outcome's own transaction
    if outcome.status == "failed":
        raise JobFailed(f"job {job_id} failed: {outcome.message}")
    if outcome.status == "verification_failed":
        raise VerificationFailed(f"job {job_id}: {outcome.message}")
    return {"job_id": job_id, "state": outcome.status, "outcome": outcome.result.get("outcome"),
            "detail": outcome.message or None}


def _job_id(task: Task, kind: JobKind, args: tuple[Any, ...], job_id: Any,
            intent: dict[str, Any]) -> tuple[int | None, Callable[[Connection], int] | None]:
    """(the job id, None) for a message that names its job; (None, what writes the job) for
    one that carries the intent."""
    if args:
        if len(args) > 1 or job_id is not None or intent:
            raise RequestError(f"takes keyword arguments (job_id, or the intent); got {len(args)} positional "
                               "argument(s)")
        job_id = args[0]  # resolve.delay(17): a lone positional argument is the job id
    if job_id is None:
        return None, _job_from_intent(task, kind, intent)
    account_id = intent.pop("account_id", None)
    if intent:
        raise RequestError(f"pass either job_id or the intent, not both (got {v.names(sorted(intent))})")
    job_id = v.positive_int(job_id, "job_id")
    if account_id is not None:
        _check_job_account(job_id, v.positive_int(account_id, "account_id"))
    return job_id, None


def _check_job_account(job_id: int, account_id: int) -> None:
    owner = store.job_account(job_id)
    if owner is not None and owner != account_id:
        # Names only what the sender gave (a missing job goes on to PoisonMessage as before).
        raise RequestError(f"job {job_id} is not a job of account {account_id}", field="job_id")


# `throws`: expected outcomes, logged without a traceback; the task still ends FAILURE.
_TASK_OPTIONS = dict(bind=True, max_retries=None, acks_late=True,
                     throws=(JobFailed, VerificationFailed, InvalidTaskArguments, PoisonMessage))


@app.task(name="writeback.resolve", **_TASK_OPTIONS)
def resolve(self: Task, *args: Any, job_id: Any = None, **intent: Any) -> dict[str, Any]:
    """Post a customer-visible resolution note, then move the ticket to the resolved status."""
    return run_job(self, JobKind.RESOLVE, args, job_id, intent)


@app.task(name="writeback.escalate", **_TASK_OPTIONS)
def escalate(self: Task, *args: Any, job_id: Any = None, **intent: Any) -> dict[str, Any]:
    """Post an internal-only handoff note, then move the ticket to the escalated status."""
    return run_job(self, JobKind.ESCALATE, args, job_id, intent)


@app.task(name="writeback.post_note", **_TASK_OPTIONS)
def post_note(self: Task, *args: Any, job_id: Any = None, **intent: Any) -> dict[str, Any]:
    return run_job(self, JobKind.POST_NOTE, args, job_id, intent)


@app.task(name="writeback.transition_status", **_TASK_OPTIONS)
def transition_status(self: Task, *args: Any, job_id: Any = None, **intent: Any) -> dict[str, Any]:
    return run_job(self, JobKind.TRANSITION_STATUS, args, job_id, intent)


@app.task(name="writeback.sweep", acks_late=False)
def sweep() -> dict[str, int]:
    return sweeper.sweep()


def _harden_redis_channel_close() -> None:
    """Work around a kombu/Celery 5.7 crash on broker loss (tests/chaos/test_broker_outage).

    When Redis goes away while a task is in flight, the consumer first `collect()`s its
    connection, which closes the default channel. kombu's Redis Channel.close deletes the
    worker's auto-delete fanout queue (remote control) *before* its generic close, so with
    Redis down it raises and leaves the channel half-open. Celery then closes the connection
    again; the second close finds the transport already detached and dies with
    AttributeError("'NoneType' object has no attribute 'hostname'"), an "Unrecoverable
    error" that stops the worker (cf. kombu#582). Finishing the close on the first pass makes
    the second one a no-op, and the worker reconnects as it should. Unacked messages stay in
    Redis's unacked hash (restored after the visibility timeout) and the job rows stay due
    for the sweeper either way.
    """
    try:
        from kombu.transport import redis as kombu_redis
        from kombu.transport import virtual
    except ImportError:  # pragma: no cover - the redis extra is a dependency
        return
    original = kombu_redis.Channel.close
    if getattr(original, "_psa_hardened", False):
        return

    def close(self: Any) -> None:
        try:
            original(self)
        finally:
            if not self.closed:
                for step in (self._disconnect_pools, self._close_clients, lambda: virtual.Channel.close(self)):
                    try:
                        step()
                    except Exception:  # Redis is down: the point is only to end up closed
                        pass

    close._psa_hardened = True  # type: ignore[attr-defined]
    kombu_redis.Channel.close = close


_harden_redis_channel_close()
