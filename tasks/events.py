"""In-process hooks for what happens to jobs (alerts, metrics, logs subscribe here), so the
runner does not import the operations code and a failing subscriber never fails a job."""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("psa_writeback.events")
_subscribers: dict[str, list[Callable[..., None]]] = defaultdict(list)

# Event names and their keyword arguments:
#   job_claimed(job_id, account_id, provider, ticket_id, attempt)
#   job_finished(job_id, kind, state, result, error_message, provider, account_id, ticket_id, connection_id, attempts,
#                open_alerts)  error_message: why it did not succeed, None on success (the runner
#                does not log it: the outcome line does); open_alerts: False when no alert about
#                the job or its connection's credentials was open as the outcome was written;
#                None when not known
#   job_retry_scheduled(job_id, kind, provider, attempt, delay, error_type)
#   psa_auth_failed(connection_id, account_id, provider, job_id, ticket_id, message)
#   long_deferral(job_id, connection_id, account_id, provider, ticket_id, seconds, asked, message)
#                the PSA (a Retry-After) or our limiter made a job or its connection wait longer
#                than LONG_DEFERRAL_ALERT_SECONDS: `seconds` the wait (capped), `asked` what was asked


def subscribe(event: str, fn: Callable[..., None]) -> None:
    if fn not in _subscribers[event]:
        _subscribers[event].append(fn)


def emit(event: str, **payload: Any) -> None:
    for fn in list(_subscribers[event]):
        try:
            fn(**payload)
        except Exception:
            log.exception("subscriber %s for %s failed", getattr(fn, "__name__", fn), event)
