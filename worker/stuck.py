"""What counts as a stuck job. Shared by the alert check (worker.alerts) and the metrics
gauge (worker.metrics), so neither has to import the other for it."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, exists, or_
from sqlalchemy.orm import aliased

from models import JobState, WritebackJob, settings
from models.enums import CLAIMABLE_STATES, TERMINAL_STATES

TERMINAL = [s.value for s in TERMINAL_STATES]
CLAIMABLE = [s.value for s in CLAIMABLE_STATES]


def stuck_after() -> dt.timedelta:
    return dt.timedelta(seconds=settings.number("STUCK_AFTER_SECONDS", 600, positive=True))


def longest_wait() -> dt.timedelta:
    """The furthest out any retry or deferral may schedule a job: the backoff's cap, or a
    Retry-After capped at PSA_MAX_RETRY_AFTER_SECONDS, or the settle time after a POST."""
    from tasks.retry import RetryPolicy

    policy = RetryPolicy.from_env()
    return dt.timedelta(seconds=max(policy.max_delay_seconds, policy.max_retry_after_seconds,
                                    policy.post_settle_seconds))


def stuck_condition(now: dt.datetime) -> Any:
    """Due (queued/retrying) since before the threshold and not waiting behind an earlier job
    on the same ticket, or running on a lease that expired before the threshold, or due
    further out than any retry may schedule it (plus the threshold): a next_attempt_at in
    2030 is a job nobody will run, however patiently the check waits for it to be due."""
    cutoff = now - stuck_after()
    J, other = WritebackJob, aliased(WritebackJob)
    behind_earlier = exists().where(other.ticket_key == J.ticket_key, other.id < J.id, other.state.notin_(TERMINAL))
    return or_(and_(J.state.in_(CLAIMABLE), J.next_attempt_at <= cutoff, ~behind_earlier),
               and_(J.state.in_(CLAIMABLE), J.next_attempt_at > now + longest_wait() + stuck_after()),
               and_(J.state == JobState.RUNNING.value, J.lease_until <= cutoff))
