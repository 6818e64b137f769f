"""Alerts: verification failures, failed jobs, dead PSA credentials, stuck jobs.

Every alert goes to three places: an ERROR log line, a row in `alerts` (queryable with the
job, ticket, expected and observed status), and a Slack-compatible webhook
(ALERT_WEBHOOK_URL) posted by its own task, `writeback.deliver_alert`, with bounded retries.

Exactly once: the row is inserted with ON CONFLICT DO NOTHING against partial unique
indexes (one per job and kind; one *open* auth alert per connection). Only the inserter
logs and enqueues the webhook, so a retried job, a redelivered message or the reconciler
cannot page twice. The webhook runs in its own task: a slow or dead receiver costs that
task a few seconds and never touches the writeback, which committed before we got here.

`writeback.check_stuck` (beat) raises stuck-job alerts, raises alerts the worker missed
(it died between committing the outcome and inserting the alert), and re-publishes
webhook deliveries whose message was lost.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from models import AccountSettings, Alert, AlertKind, DeliveryState, JobState, WritebackJob, settings, utcnow
from models.alerts import close_alerts
from models.db import session_scope
from models.limits import clamp
from tasks.retry import jittered_delay
from tasks.store import db_retry
from worker import metrics
from worker.alert_payload import slack_message, summary
from worker.app import app
from worker.stuck import longest_wait, stuck_after, stuck_condition

log = logging.getLogger("psa_writeback.alerts")


def webhook_retry_seconds() -> float:
    return settings.number("ALERT_WEBHOOK_RETRY_SECONDS", 15, minimum=0)


def webhook_max_delay_seconds() -> float:
    return settings.number("ALERT_WEBHOOK_MAX_DELAY_SECONDS", 600, minimum=0)


def webhook_timeout_seconds() -> float:
    return settings.number("ALERT_WEBHOOK_TIMEOUT_SECONDS", 5, positive=True)


def webhook_max_attempts() -> int:
    return settings.integer("ALERT_WEBHOOK_MAX_ATTEMPTS", 6, positive=True)


def webhook_url() -> str:
    return os.environ.get("ALERT_WEBHOOK_URL", "").strip()


# --- raising -----------------------------------------------------------------------------

def raise_for_job(kind: AlertKind, job_id: int, message: str | None = None,
                  details: dict[str, Any] | None = None) -> int | None:
    """Insert the alert for this job and kind unless it exists; returns the new id or None."""
    found = _insert_for_job(kind, job_id, message, details)
    return _announce(*found) if found else None


@db_retry
def _insert_for_job(kind: AlertKind, job_id: int, message: str | None,
                    details: dict[str, Any] | None) -> tuple[int | None, dict[str, Any]] | None:
    with session_scope() as db:
        job = db.get(WritebackJob, job_id)
        if job is None:
            return None
        expected = job.expected_status_id if job.expected_status_id is not None else job.target_status_id
        values = dict(kind=kind.value, job_id=job.id, job_kind=job.kind, account_id=job.account_id,
                      provider=job.provider, connection_id=job.psa_connection_id, ticket_id=job.ticket_id,
                      expected_status_id=expected, expected_status_name=job.expected_status_name,
                      observed_status_id=job.observed_status_id, observed_status_name=job.observed_status_name,
                      message=(message or job.error_message or "")[:2000],
                      details={"state": job.state, "attempts": job.attempts, "max_attempts": job.max_attempts,
                               "error_type": job.error_type, **(details or {})})
        return _insert_or_ignore(db, values), values


def raise_auth_failed(connection_id: int | None, account_id: int | None, provider: str | None,
                      job_id: int | None, ticket_id: int | None, message: str) -> int | None:
    """One open alert per connection: every job on dead credentials lands here, one pages."""
    if connection_id is None:
        return None
    return _announce(*_insert_auth(connection_id, account_id, provider, job_id, ticket_id, message))


@db_retry
def _insert_auth(connection_id: int, account_id: int | None, provider: str | None, job_id: int | None,
                 ticket_id: int | None, message: str) -> tuple[int | None, dict[str, Any]]:
    with session_scope() as db:
        values = dict(kind=AlertKind.AUTH_FAILED.value, job_id=job_id, account_id=account_id, provider=provider,
                      connection_id=connection_id, ticket_id=ticket_id, message=message[:2000],
                      details={"hint": "update the connection's keys; jobs on it fail until then"})
        return _insert_or_ignore(db, values), values


def _insert_or_ignore(db: Session, values: dict[str, Any]) -> int | None:
    now = utcnow()
    pending = bool(webhook_url())
    values = dict(values, created_at=now,
                  delivery_state=(DeliveryState.PENDING if pending else DeliveryState.DISABLED).value,
                  delivery_next_at=now if pending else None)
    if db.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    values = clamp(Alert.__table__, values)  # vendor status names are stored cut, never fail the insert
    return db.execute(insert(Alert).values(**values).on_conflict_do_nothing().returning(Alert.id)).scalar()


def _announce(alert_id: int | None, values: dict[str, Any]) -> int | None:
    kind, job_id = values["kind"], values.get("job_id")
    if alert_id is None:
        log.info("%s alert for %s already raised; not raising another", kind,
                 f"connection {values.get('connection_id')}" if kind == AlertKind.AUTH_FAILED.value else f"job {job_id}",
                 extra={"job_id": job_id, "alert_kind": kind, "step": "alert"})
        return None
    log.error("ALERT %s: %s", kind, summary(values), extra={
        "step": "alert", "alert_id": alert_id, "alert_kind": kind, "job_id": job_id,
        "account_id": values.get("account_id"), "provider": values.get("provider"),
        "ticket_id": values.get("ticket_id"), "connection_id": values.get("connection_id"),
        "expected_status_id": values.get("expected_status_id"),
        "observed_status_id": values.get("observed_status_id")})
    metrics.ALERTS.labels(kind).inc()
    if webhook_url():
        publish_delivery(alert_id)
    return alert_id


def publish_delivery(alert_id: int) -> bool:
    try:
        deliver_alert.apply_async(kwargs={"alert_id": alert_id}, retry=False)
        return True
    except Exception as err:  # broker down: check_stuck re-publishes overdue deliveries
        log.warning("could not queue the webhook for alert %s (%s); the reconciler will", alert_id,
                    type(err).__name__, extra={"alert_id": alert_id})
        return False


@db_retry
def resolve(alert_id: int, *, resolution: str) -> int:
    """An operator closes one open alert. Returns how many were closed (0 or 1)."""
    with session_scope() as db:
        return close_alerts(db, Alert.id == alert_id, resolution=resolution)


@db_retry
def resolve_on_finish(job_id: int, state: str, connection_id: int | None) -> int:
    """One short UPDATE per finished job: a stuck alert closes whatever the outcome; on
    success the job's own alerts close (a retried job that now worked), and so does the
    connection's auth alert (its credentials just worked)."""
    mine, resolution = Alert.job_id == job_id, f"job {job_id} finished: {state}"
    if state != JobState.SUCCEEDED.value:
        mine = and_(mine, Alert.kind == AlertKind.JOB_STUCK.value)
    elif connection_id is not None:
        mine = or_(mine, and_(Alert.kind == AlertKind.AUTH_FAILED.value, Alert.connection_id == connection_id))
        resolution += f"; the credentials of connection {connection_id} work again"
    with session_scope() as db:
        return close_alerts(db, mine, resolution=resolution)


# --- webhook delivery -----------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    status: str  # sent | retry | failed | skipped | disabled
    attempt: int = 0
    delay: float = 0.0
    http_status: int | None = None
    error: str | None = None


def _backoff(attempt: int) -> float:
    return jittered_delay(attempt, webhook_retry_seconds(), webhook_max_delay_seconds())


def deliver(alert_id: int) -> Delivery:
    """One delivery attempt: claim the row, POST outside any transaction, record the result."""
    now = utcnow()
    lease = dt.timedelta(seconds=webhook_timeout_seconds() * 3)
    with session_scope() as db:
        attempt = db.execute(update(Alert).where(
            Alert.id == alert_id, Alert.delivery_state == DeliveryState.PENDING.value,
            or_(Alert.delivery_lease_until.is_(None), Alert.delivery_lease_until < now))
            .values(delivery_lease_until=now + lease, delivery_attempts=Alert.delivery_attempts + 1)
            .returning(Alert.delivery_attempts)).scalar()
        if attempt is None:  # delivered, given up, or another delivery is in flight
            return Delivery("skipped")
        alert = db.get(Alert, alert_id)
        account_name = db.scalar(select(AccountSettings.name).where(AccountSettings.account_id == alert.account_id))
        body = slack_message(alert, account_name)
    url = webhook_url()
    if not url:
        return _record(alert_id, Delivery("disabled", attempt, error="ALERT_WEBHOOK_URL is not set"))
    code, error = _post(url, body)
    if code is not None and 200 <= code < 300:
        return _record(alert_id, Delivery("sent", attempt, http_status=code))
    retryable = code is None or code == 429 or code >= 500  # other 4xx: the hook is misconfigured
    if retryable and attempt < webhook_max_attempts():
        return _record(alert_id, Delivery("retry", attempt, _backoff(attempt), code, error))
    return _record(alert_id, Delivery("failed", attempt, http_status=code, error=error))


def _post(url: str, body: dict[str, Any]) -> tuple[int | None, str | None]:
    import requests

    timeout = webhook_timeout_seconds()
    try:
        resp = requests.post(url, json=body, timeout=(min(timeout, 3), timeout))
    except requests.RequestException as err:
        # Never str(err): it quotes the URL, and a Slack webhook URL is itself a secret.
        return None, type(err).__name__
    return resp.status_code, None if resp.ok else f"HTTP {resp.status_code}: {resp.text[:200]}"


@db_retry
def _record(alert_id: int, d: Delivery) -> Delivery:
    now = utcnow()
    state = {"sent": DeliveryState.SENT, "failed": DeliveryState.FAILED, "disabled": DeliveryState.DISABLED}.get(
        d.status, DeliveryState.PENDING)
    with session_scope() as db:
        db.execute(update(Alert).where(Alert.id == alert_id).values(
            delivery_state=state.value, delivery_status_code=d.http_status, delivery_error=d.error,
            delivery_lease_until=None, delivery_next_at=now + dt.timedelta(seconds=d.delay) if d.status == "retry"
            else None, delivered_at=now if d.status == "sent" else None))
    metrics.ALERT_DELIVERIES.labels(d.status).inc()
    extra = {"alert_id": alert_id, "attempt": d.attempt, "http_status": d.http_status, "delivery": d.status,
             "step": "alert_webhook"}
    if d.status == "failed":
        log.error("webhook for alert %s gave up after %s attempt(s): %s", alert_id, d.attempt, d.error, extra=extra)
    elif d.status == "retry":
        log.warning("webhook for alert %s failed (%s); retrying in %.1fs", alert_id, d.error, d.delay, extra=extra)
    else:
        log.info("webhook for alert %s: %s", alert_id, d.status, extra=extra)
    return d


@app.task(name="writeback.deliver_alert", bind=True, acks_late=True, max_retries=None, ignore_result=True)
def deliver_alert(self, alert_id: int) -> dict[str, Any]:
    """POST one alert to ALERT_WEBHOOK_URL; retried with backoff, ALERT_WEBHOOK_MAX_ATTEMPTS in all."""
    d = deliver(int(alert_id))
    if d.status == "retry":
        raise self.retry(countdown=d.delay, max_retries=None)
    return {"alert_id": alert_id, "delivery": d.status, "attempt": d.attempt, "http_status": d.http_status}


# --- stuck jobs and the reconciler -----------------------------------------------------------

@db_retry
def find_stuck(limit: int = 200) -> list[tuple[int, str, dt.datetime]]:
    J = WritebackJob
    alerted = exists().where(Alert.job_id == J.id, Alert.kind == AlertKind.JOB_STUCK.value)
    with session_scope() as db:
        rows = db.execute(select(J.id, J.state, func.coalesce(J.lease_until, J.next_attempt_at))
                          .where(stuck_condition(utcnow()), ~alerted).order_by(J.id).limit(limit)).all()
    return [(r[0], r[1], r[2]) for r in rows]


@db_retry
def find_unalerted(limit: int = 200) -> list[tuple[int, AlertKind]]:
    """Terminal failures without their alert (the worker died in between). Auth failures
    are left to their per-connection alert."""
    J, now = WritebackJob, utcnow()
    window = and_(J.finished_at >= now - dt.timedelta(hours=24), J.finished_at <= now - dt.timedelta(seconds=30))
    found: list[tuple[int, AlertKind]] = []
    with session_scope() as db:
        for state, kind, extra in ((JobState.VERIFICATION_FAILED, AlertKind.VERIFICATION_FAILED, True),
                                   (JobState.FAILED, AlertKind.JOB_FAILED,
                                    or_(J.error_type.is_(None), J.error_type != "PsaAuthError"))):
            has = exists().where(Alert.job_id == J.id, Alert.kind == kind.value)
            ids = db.scalars(select(J.id).where(J.state == state.value, window, extra, ~has).limit(limit)).all()
            found.extend((i, kind) for i in ids)
    return found


@db_retry
def resolve_finished_stuck() -> int:
    """Stuck alerts whose job has finished since: the finishing worker closes them, unless
    it was killed right after its final commit, or the alert was raised as the job finished."""
    J = WritebackJob
    with session_scope() as db:
        return close_alerts(db, Alert.kind == AlertKind.JOB_STUCK.value,
                            exists().where(J.id == Alert.job_id, J.finished_at.is_not(None)),
                            resolution="the job has finished since (found by the periodic check)")


@db_retry
def overdue_deliveries(limit: int = 200) -> list[int]:
    now = utcnow()
    with session_scope() as db:
        ids = db.scalars(select(Alert.id).where(Alert.delivery_state == DeliveryState.PENDING.value,
                                                Alert.delivery_next_at <= now - dt.timedelta(seconds=60))
                         .order_by(Alert.id).limit(limit).with_for_update(skip_locked=True)).all()
        if ids:
            db.execute(update(Alert).where(Alert.id.in_(ids)).values(delivery_next_at=now))
    return list(ids)


def run_checks() -> dict[str, int]:
    now = utcnow()
    stuck = 0
    for job_id, state, due_since in find_stuck():
        waited = int((now - due_since).total_seconds())
        message = (f"job {job_id} is {state} and has been due for {waited}s without starting "
                   f"(threshold {int(stuck_after().total_seconds())}s): is a worker consuming the queue?")
        if waited < 0:
            message = (f"job {job_id} is {state} with its next attempt {-waited}s from now ({due_since.isoformat()}), "
                       f"further out than any retry or Retry-After may put it "
                       f"({int(longest_wait().total_seconds())}s): nobody runs it before then; cancel it or reschedule it")
        stuck += raise_for_job(AlertKind.JOB_STUCK, job_id, message, {"due_since": due_since.isoformat()}) is not None
    missed = sum(raise_for_job(kind, job_id, details={"reconciled": True}) is not None
                 for job_id, kind in find_unalerted())
    republished = sum(publish_delivery(a) for a in overdue_deliveries()) if webhook_url() else 0
    return {"stuck": stuck, "reconciled": missed, "republished": republished, "closed": resolve_finished_stuck()}


@app.task(name="writeback.check_stuck", acks_late=False, ignore_result=True)
def check_stuck() -> dict[str, int]:
    """Beat: stuck-job alerts, missed alerts, lost webhook deliveries, stuck alerts of jobs
    that have finished since."""
    return run_checks()
