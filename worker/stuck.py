"""What counts as a stuck job. Shared by the alert check (worker.alerts) and the metrics
gauge (worker.metrics), so neither has to import the other for it."""
from __future__ import annotations

import datetime as dt
import os
from typing import Any

from sqlalchemy import and_, exists, or_
from sqlalchemy.orm import aliased

from models import JobState, WritebackJob
from models.enums import CLAIMABLE_STATES, TERMINAL_STATES

TERMINAL = [s.value for s in TERMINAL_STATES]
CLAIMABLE = [s.value for s in CLAIMABLE_STATES]


def stuck_after() -> dt.timedelta:
    return dt.timedelta(seconds=float(os.environ.get("STUCK_AFTER_SECONDS", "600")))


def stuck_condition(now: dt.datetime) -> Any:
    """Due (queued/retrying) since before the threshold and not waiting behind an earlier job
    on the same ticket, or running on a lease that expired before the threshold."""
    cutoff = now - stuck_after()
    J, other = WritebackJob, aliased(WritebackJob)
    behind_earlier = exists().where(other.ticket_key == J.ticket_key, other.id < J.id, other.state.notin_(TERMINAL))
    return or_(and_(J.state.in_(CLAIMABLE), J.next_attempt_at <= cutoff, ~behind_earlier),
               and_(J.state == JobState.RUNNING.value, J.lease_until <= cutoff))
