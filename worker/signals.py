"""Wires operations into the worker: job events → alerts, metrics, log lines; PSA calls →
latency metrics; Celery signals → log context, redacted task arguments, metrics endpoint.

Imported by the worker at start-up (listed in app.conf.include), never by the web tier.
Every subscriber is separate so a failing one (say, the database refusing an alert insert)
does not cost the others; tasks.events logs and swallows subscriber errors.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

from celery import signals
from sqlalchemy import select

from models import AlertKind
from providers import http
from tasks import events
from worker import alerts, logs, metrics
from worker.app import app
from worker.startup import CheckSettings

log = logging.getLogger("psa_writeback.ops")

# Keys a by-name sender may put in a writeback task's kwargs that are safe to show in Flower.
_SAFE_KWARGS = {"job_id", "session_id", "psa_connection_id", "status_id", "visibility", "max_attempts",
                "alert_id", "account_id"}


# --- job events ------------------------------------------------------------------------------

def _count_finished(*, provider: str | None, kind: str, state: str, **_: Any) -> None:
    metrics.WRITEBACKS.labels(metrics.label(provider), kind, state).inc()
    if state == "verification_failed":
        metrics.VERIFICATION_FAILURES.labels(metrics.label(provider), kind).inc()


def _log_finished(*, job_id: int, kind: str, state: str, result: dict[str, Any] | None, attempts: int,
                  error_message: str | None = None, **_: Any) -> None:
    result = result or {}
    status = result.get("status") or {}
    if status:  # the ticket was re-read: one verify line, whatever it showed (grep step=verify)
        verified = state == "succeeded" and bool(status.get("verified_at"))
        log.log(logging.INFO if verified else logging.WARNING, "status %s: expected %s (%s), observed %s (%s)",
                "verified" if verified else "did not verify", status.get("expected_id"), status.get("expected_name"),
                status.get("observed_id"), status.get("observed_name"),
                extra={"job_id": job_id, "step": "verify", "expected_status_id": status.get("expected_id"),
                       "observed_status_id": status.get("observed_id")})
    # The job's one outcome line (the runner does not log failures itself), with the reason
    # when it did not succeed. WARNING, not ERROR: the page-worthy line is the alert's
    # ("ALERT ...", step=alert).
    level = logging.INFO if state == "succeeded" else logging.WARNING
    log.log(level, "job %s %s (%s) after %s attempt(s)%s", job_id, state, result.get("outcome"), attempts,
            f": {error_message}" if error_message else "",
            extra={"job_id": job_id, "step": "outcome", "state": state, "outcome": result.get("outcome"),
                   "kind": kind, "attempt": attempts})


def _alert_finished(*, job_id: int, state: str, result: dict[str, Any] | None, connection_id: int | None,
                    provider: str | None, open_alerts: bool | None = None, **_: Any) -> None:
    error_type = ((result or {}).get("error") or {}).get("type")
    if state == "verification_failed":
        alerts.raise_for_job(AlertKind.VERIFICATION_FAILED, job_id)
    elif state == "failed" and error_type != "PsaAuthError":  # dead credentials page once per connection
        alerts.raise_for_job(AlertKind.JOB_FAILED, job_id)
    if open_alerts is not False:  # the outcome's own write saw none open: nothing to close
        alerts.resolve_on_finish(job_id, state, connection_id if provider is not None else None)


def _count_retry(*, provider: str | None, kind: str, error_type: str | None, **_: Any) -> None:
    metrics.RETRIES.labels(metrics.label(provider), kind, metrics.label(error_type)).inc()


def _auth_failed(*, connection_id: int | None, account_id: int | None, provider: str | None, job_id: int | None,
                 ticket_id: int | None, message: str, **_: Any) -> None:
    metrics.AUTH_FAILURES.labels(metrics.label(provider)).inc()
    alerts.raise_auth_failed(connection_id, account_id, provider, job_id, ticket_id, message)


def _long_deferral(*, job_id: int, message: str, seconds: float, asked: float | None, **_: Any) -> None:
    # One per job (the alerts' unique index); of a connection's 429 storm only the job
    # whose 429 made the cooldown long gets here (tasks.ratelimit.start_cooldown).
    finite = asked is not None and math.isfinite(asked)  # "Retry-After: inf" is not JSON
    alerts.raise_for_job(AlertKind.LONG_DEFERRAL, job_id, message, {"wait_seconds": round(seconds, 1),
                                                                     "asked_seconds": asked if finite else None})


def _psa_call(*, provider: str, operation: str, status: int | None, seconds: float, error: str | None,
              **_: Any) -> None:
    metrics.PSA_LATENCY.labels(provider, operation).observe(seconds)
    metrics.PSA_REQUESTS.labels(provider, operation, metrics.call_result(status, error)).inc()
    if operation == "update_status":  # the one call that is a step of its own in the log
        log.info("status PATCH answered %s in %.3fs", status if status is not None else error, seconds,
                 extra={"step": "patch", "operation": operation, "http_status": status, "seconds": round(seconds, 3)})
    else:
        log.debug("%s answered %s in %.3fs", operation, status if status is not None else error, seconds,
                  extra={"step": "psa_call", "operation": operation, "http_status": status,
                         "seconds": round(seconds, 3)})


for _event, _fn in (("job_finished", _count_finished), ("job_finished", _log_finished),
                    ("job_finished", _alert_finished), ("job_retry_scheduled", _count_retry),
                    ("psa_auth_failed", _auth_failed), ("long_deferral", _long_deferral)):
    events.subscribe(_event, _fn)
http.add_observer(_psa_call)


# --- log context --------------------------------------------------------------------------

def _bind_claimed(*, job_id: int, account_id: int | None, provider: str | None, ticket_id: int | None,
                  **_: Any) -> None:
    logs.bind(job_id=job_id, account_id=account_id, provider=provider, ticket_id=ticket_id)


events.subscribe("job_claimed", _bind_claimed)


def job_context(job_id: int) -> dict[str, Any] | None:
    """account, provider, ticket of a job: one primary-key read (not cached, so a recycled
    id, as in a truncated test database, can never borrow another job's context). Only for
    a line naming a job its task's context does not know yet; a claimed job's context comes
    with the claim (job_claimed)."""
    from models import WritebackJob
    from models.db import session_scope

    with session_scope() as db:
        row = db.execute(select(WritebackJob.account_id, WritebackJob.provider, WritebackJob.ticket_id)
                         .where(WritebackJob.id == job_id)).first()
    return None if row is None else {"account_id": row[0], "provider": row[1], "ticket_id": row[2]}


logs.set_job_resolver(job_context)


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, kwargs: dict[str, Any] | None = None,
               **_: Any) -> None:
    logs.clear()
    logs.bind(task_id=task_id, task_name=getattr(task, "name", None))
    job_id = (kwargs or {}).get("job_id")
    if isinstance(job_id, int):
        logs.bind(job_id=job_id)  # account, provider, ticket follow with the claim (job_claimed)
    elif (alert_id := (kwargs or {}).get("alert_id")) is not None:
        logs.bind(alert_id=alert_id)


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    logs.clear()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _structured_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    if logger is not None:
        logs.install(logger)


# --- what Flower (and `celery inspect`) show as a task's arguments -------------------------

def redact_kwargs(kwargs: dict[str, Any]) -> str:
    shown = {k: (v if k in _SAFE_KWARGS else f"<{type(v).__name__} redacted>") for k, v in kwargs.items()}
    return repr(shown)


@signals.task_received.connect
def _redact_received(request: Any = None, **_: Any) -> None:
    """The task-received event (what Flower lists) carries the sender's kwargsrepr, which is
    the full kwargs unless the sender passed kwargsrepr=. Our enqueue sends {"job_id": N};
    a web tier sending the intent by name would put the markdown there. This handler runs
    just before that event is sent and replaces the repr with ids only."""
    if request is None or not str(getattr(request, "name", "")).startswith("writeback."):
        return
    try:
        request._kwargsrepr = redact_kwargs(dict(request.kwargs or {}))  # noqa: SLF001 - see docstring
        if request.args:
            request._argsrepr = repr([a if isinstance(a, int) else f"<{type(a).__name__} redacted>"
                                      for a in request.args])  # noqa: SLF001
    except Exception:
        request._kwargsrepr = "<redacted>"  # noqa: SLF001


# A numeric setting that does not parse stops the worker before it takes a message. Added
# here, not in worker.app: the check reads worker.alerts' settings, and worker.alerts
# imports worker.app. The worker imports this module (app.conf.include) before it builds
# its bootsteps.
app.steps["worker"].add(CheckSettings)


# --- metrics endpoint ---------------------------------------------------------------------

@signals.worker_init.connect
def _worker_started(sender: Any = None, **_: Any) -> None:
    metrics.clean_multiprocess_dir()
    metrics.start_worker_server()
    if sender is not None and getattr(sender, "pool_cls", None) is not None:
        logs.quiet_uncancellable_tasks(sender.pool_cls)  # broker loss under threads: one line per task
    # A task-sent event carries saferepr(kwargs) built by the publisher, out of reach of the
    # redaction above. The worker publishes only retries, alert deliveries and wake-ups; a
    # retry of a message sent by name with the intent re-sends the markdown, and Flower would
    # show it for the whole countdown. Flower still gets received/started/retried/succeeded.
    if sender is not None and getattr(sender, "app", None) is not None:
        sender.app.conf.task_send_sent_event = False


@signals.worker_process_shutdown.connect
def _mark_process_dead(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and pid:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
