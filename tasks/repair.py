"""Operator repairs behind `psa-writeback jobs retry | reverify | cancel`.

Each is one guarded UPDATE (`WHERE state = <the state we checked>`), so racing a worker or
another operator changes nothing twice, plus a writeback_job_actions row in the same
transaction: who did what, from which state to which. Messages are published only after
that commit (the row, not the message, is the promise; the sweeper covers a lost publish).

- retry: a failed job goes back to queued with a fresh attempt budget. Its note progress is
  kept, so a note that already landed is not posted again.
- reverify: re-read the ticket of a verification_failed job. If the status is now the
  expected one (a person fixed the required field, a slow workflow caught up), the job is
  verified without posting or patching anything. Otherwise it stays verification_failed
  with the fresh observation, unless `reapply` re-queues it to PATCH and verify again.
- cancel: only queued or retrying jobs; a running one finishes its attempt first.
"""
from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import AiSession, Alert, AlertKind, JobAction, JobState, NoteState, PsaConnection, WritebackJob, utcnow
from models.alerts import close_alerts
from models.db import session_scope
from models.limits import clamp
from models.enums import CLAIMABLE_STATES
from models.notify import JOB_CHANNEL, notify
from providers import provider_for
from providers.base import Credentials
from providers.errors import PsaError
from tasks import store
from tasks.retry import RetryPolicy
from tasks.runner import _DONE_STATUS

Publish = Callable[[int, str], bool]


@dataclass(frozen=True)
class RepairResult:
    job_id: int
    action: str
    ok: bool
    state: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return os.environ.get("PSA_WRITEBACK_ACTOR") or f"{user} (cli)"


def _publish(publish: Publish | None) -> Publish:
    if publish is not None:
        return publish
    from tasks.enqueue import publish as default

    return default


def _action(db: Session, job: WritebackJob, action: str, actor: str, from_state: str, to_state: str, message: str,
            **details: Any) -> None:
    db.add(JobAction(job_id=job.id, action=action, actor=actor[:200], at=utcnow(), from_state=from_state,
                     to_state=to_state, message=message, details=details or None))


def _requeue(db: Session, job: WritebackJob, from_state: str, budget: int) -> str | None:
    """Back to queued with `budget` more attempts; returns why not, or None."""
    now = utcnow()
    J = WritebackJob
    try:
        with db.begin_nested():  # the live-writeback unique index may refuse: roll back this only
            res = db.execute(update(J).where(J.id == job.id, J.state == from_state).values(
                state=JobState.QUEUED.value, max_attempts=J.attempts + budget, next_attempt_at=now, published_at=now,
                lease_until=None, claimed_by=None, finished_at=None, error_type=None, error_message=None,
                updated_at=now))
    except IntegrityError:
        other = db.scalar(select(J.id).where(J.session_id == job.session_id, J.kind == job.kind, J.id != job.id,
                                             J.state.notin_([JobState.FAILED.value, JobState.CANCELLED.value])))
        return f"session {job.session_id} already has a live {job.kind} writeback (job {other}); " \
               "running this one too could write twice"
    return None if res.rowcount == 1 else f"job changed while we looked (now {job.state})"


def retry(job_id: int, *, actor: str | None = None, budget: int | None = None,
          publish: Publish | None = None) -> RepairResult:
    actor = actor or default_actor()
    budget = budget or RetryPolicy.from_env().max_attempts
    with session_scope() as db:
        job = db.get(WritebackJob, job_id)
        if job is None:
            return RepairResult(job_id, "retry", False, None, "no such job")
        if job.state != JobState.FAILED.value:
            hint = "; use `jobs reverify` for verification failures" if job.state == "verification_failed" else ""
            return RepairResult(job_id, "retry", False, job.state, f"job is {job.state}: only failed jobs can be "
                                                                   f"retried{hint}")
        previous_error, attempts_before = job.error_message, job.attempts
        refused = _requeue(db, job, JobState.FAILED.value, budget)
        if refused:
            return RepairResult(job_id, "retry", False, JobState.FAILED.value, refused)
        note = " (its note is already on the ticket and will not be posted again)" \
            if job.note_state == NoteState.POSTED.value else ""
        message = f"re-queued with {budget} more attempts{note}"
        _action(db, job, "retry", actor, JobState.FAILED.value, JobState.QUEUED.value, message,
                previous_error=previous_error, attempts_before=attempts_before)
        kind = job.kind
    published = _publish(publish)(job_id, kind)
    return RepairResult(job_id, "retry", True, JobState.QUEUED.value,
                        message if published else message + "; publish failed, the sweeper will pick it up")


@dataclass(frozen=True)
class _Target:
    kind: str
    session_id: int
    ticket_id: int
    target: int
    provider: str
    credentials: Credentials
    result: dict[str, Any]


def _load_target(job_id: int) -> _Target | RepairResult:
    with session_scope() as db:
        job = db.get(WritebackJob, job_id)
        if job is None:
            return RepairResult(job_id, "reverify", False, None, "no such job")
        if job.state != JobState.VERIFICATION_FAILED.value:
            return RepairResult(job_id, "reverify", False, job.state,
                                f"job is {job.state}: only verification_failed jobs can be re-verified")
        if (job.psa_connection_id is None or job.ticket_id is None or job.target_status_id is None
                or job.provider is None):
            return RepairResult(job_id, "reverify", False, job.state, "job has no PSA ticket or target status")
        conn = db.get(PsaConnection, job.psa_connection_id)
        connection = (job.psa_connection_id, None, None, None, None, None, None, None) if conn is None else (
            job.psa_connection_id, conn.id, conn.is_active, conn.base_url, conn.company_id, conn.client_id,
            conn.public_key_encrypted, conn.private_key_encrypted)
        snapshot = (job.kind, job.session_id, job.ticket_id, job.target_status_id, job.provider, dict(job.result or {}))
    kind, session_id, ticket_id, target, provider, result = snapshot
    creds, setup_error = store.credentials_for(*connection)  # decrypted outside the transaction
    if creds is None:
        return RepairResult(job_id, "reverify", False, JobState.VERIFICATION_FAILED.value,
                            f"cannot re-read ticket {ticket_id}: {setup_error}")
    return _Target(kind, session_id, ticket_id, target, provider, creds, result)


def reverify(job_id: int, *, actor: str | None = None, reapply: bool = False, budget: int | None = None,
             publish: Publish | None = None) -> RepairResult:
    actor = actor or default_actor()
    t = _load_target(job_id)
    if isinstance(t, RepairResult):
        return t
    try:
        ticket = provider_for(t.provider, t.credentials).get_ticket(t.ticket_id)
    except PsaError as err:
        return RepairResult(job_id, "reverify", False, JobState.VERIFICATION_FAILED.value,
                            f"could not read ticket {t.ticket_id}: {err}")
    now, J = utcnow(), WritebackJob
    observed = f"{ticket.status_id} ({ticket.status_name})"
    with session_scope() as db:
        job = db.get(J, job_id)
        if ticket.status_id == t.target:
            status = dict(t.result.get("status") or {}, observed_id=ticket.status_id, observed_name=ticket.status_name,
                          verified_at=now.isoformat())
            result = dict(t.result, outcome="verified", status=status, reverified_by=actor)
            res = db.execute(update(J).where(J.id == job_id, J.state == JobState.VERIFICATION_FAILED.value).values(
                **clamp(J.__table__, dict(state=JobState.SUCCEEDED.value, verified_at=now,
                                          observed_status_id=ticket.status_id, observed_status_name=ticket.status_name,
                                          error_type=None, error_message=None, result=result, updated_at=now))))
            if res.rowcount != 1:
                return RepairResult(job_id, "reverify", False, job.state, f"job changed while we looked (now {job.state})")
            values: dict[str, Any] = {"psa_status_id": ticket.status_id, "psa_status_name": ticket.status_name,
                                      "psa_status_verified_at": now, "updated_at": now}
            if done := _DONE_STATUS.get(t.kind):
                values["status"] = done.value
            db.execute(update(AiSession).where(AiSession.id == t.session_id).values(**clamp(AiSession.__table__, values)))
            message = f"ticket {t.ticket_id} now shows {observed}: verified without posting or patching again"
            _action(db, job, "reverify", actor, JobState.VERIFICATION_FAILED.value, JobState.SUCCEEDED.value, message)
            close_alerts(db, Alert.job_id == job_id, Alert.kind == AlertKind.VERIFICATION_FAILED.value,
                         resolution=f"re-verified by {actor}")
            notify(db, JOB_CHANNEL, job_id)  # its outcome changed: listeners read it again
            return RepairResult(job_id, "reverify", True, JobState.SUCCEEDED.value, message)
        db.execute(update(J).where(J.id == job_id, J.state == JobState.VERIFICATION_FAILED.value).values(
            **clamp(J.__table__, dict(observed_status_id=ticket.status_id, observed_status_name=ticket.status_name,
                                      updated_at=now))))
        message = f"ticket {t.ticket_id} still shows {observed}, expected {t.target}"
        if not reapply:
            _action(db, job, "reverify", actor, JobState.VERIFICATION_FAILED.value,
                    JobState.VERIFICATION_FAILED.value, message)
            return RepairResult(job_id, "reverify", False, JobState.VERIFICATION_FAILED.value,
                                message + "; pass --reapply to PATCH it again")
        refused = _requeue(db, job, JobState.VERIFICATION_FAILED.value, budget or RetryPolicy.from_env().max_attempts)
        if refused:
            return RepairResult(job_id, "reverify", False, JobState.VERIFICATION_FAILED.value, refused)
        message += "; re-queued to PATCH the status and verify again (the note is not posted again)"
        _action(db, job, "reapply", actor, JobState.VERIFICATION_FAILED.value, JobState.QUEUED.value, message)
    published = _publish(publish)(job_id, t.kind)
    return RepairResult(job_id, "reverify", True, JobState.QUEUED.value,
                        message if published else message + "; publish failed, the sweeper will pick it up")


def cancel(job_id: int, *, actor: str | None = None, reason: str = "", publish: Publish | None = None) -> RepairResult:
    actor = actor or default_actor()
    now, J = utcnow(), WritebackJob
    with session_scope() as db:
        job = db.get(J, job_id)
        if job is None:
            return RepairResult(job_id, "cancel", False, None, "no such job")
        before = job.state
        text = f"cancelled by {actor}" + (f": {reason}" if reason else "")
        res = db.execute(update(J).where(J.id == job_id, J.state.in_([s.value for s in CLAIMABLE_STATES])).values(
            state=JobState.CANCELLED.value, finished_at=now, lease_until=None, error_type="Cancelled",
            error_message=text[:2000], updated_at=now))
        if res.rowcount != 1:
            db.refresh(job)
            why = "it is running now; let the attempt finish" if job.state == "running" else f"it is {job.state}"
            return RepairResult(job_id, "cancel", False, job.state, f"only queued or retrying jobs can be cancelled: {why}")
        message = text
        if job.note_state == NoteState.INTENT.value:
            message += "; note: an earlier attempt may have posted the note before failing, check the ticket"
        _action(db, job, "cancel", actor, before, JobState.CANCELLED.value, message)
        close_alerts(db, Alert.job_id == job_id, Alert.kind == AlertKind.JOB_STUCK.value,
                     resolution=f"cancelled by {actor}")
        notify(db, JOB_CHANNEL, job_id)  # a web request waiting on it gets `cancelled` now
    nxt = store.next_on_ticket(job_id)  # a job queued behind this one on the ticket may go now
    if nxt is not None:
        _publish(publish)(*nxt)
    return RepairResult(job_id, "cancel", True, JobState.CANCELLED.value, message)
