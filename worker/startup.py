"""Read every numeric setting once as the worker starts (models.settings).

Each is read where it is used, often per job: without this, `PSA_READ_TIMEOUT=30s` would
let the worker start and then fail every job at its first PSA call. A worker bootstep, not
a worker_init handler: Celery logs and ignores a signal handler's exception, while a
step's stops the worker before it takes a message, with the bad settings named (a reader
of several names its first). tests/models/test_settings.py checks that this list reads
every setting the code reads.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import bootsteps

from models.crypto import ConfigurationError


def _readers() -> list[Callable[[], Any]]:
    from models import db
    from providers import http, picklists
    from tasks import ratelimit, retry, steps, store, sweeper, writeback
    from worker import alerts, stuck, task_events

    return [http.timeouts, http.call_deadline, http.max_response_bytes, http.max_sessions, http.idle_seconds,
            http.pool_size, picklists.ttl_seconds, ratelimit.rate_per_second, ratelimit.burst, ratelimit.max_wait,
            ratelimit.default_cooldown, ratelimit.max_inflight, ratelimit.max_retry_after,
            ratelimit.long_deferral_after, retry.RetryPolicy.from_env, steps.verify_reads, store.lease_seconds,
            sweeper.republish_after, sweeper.backlog_republish_after, writeback.db_outage_countdown,
            stuck.stuck_after, task_events.flush_seconds, alerts.webhook_retry_seconds,
            alerts.webhook_max_delay_seconds, alerts.webhook_timeout_seconds, alerts.webhook_max_attempts,
            db.pool_settings]


def check_settings() -> None:
    """Raise one ConfigurationError naming the numeric settings that do not parse (each
    reader's first)."""
    problems: list[str] = []
    for read in _readers():
        try:
            read()
        except ConfigurationError as err:
            if str(err) not in problems:
                problems.append(str(err))
    if problems:
        raise ConfigurationError("bad setting(s): " + "; ".join(problems))


class CheckSettings(bootsteps.Step):
    """The worker's first step: check_settings()."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        check_settings()
        super().__init__(parent, **kwargs)
