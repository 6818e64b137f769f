"""The beat-driven safety net: re-publish jobs whose message was lost.

A job can be due with no message for it in the broker: the publish after commit failed
(Redis down), a retry's publish failed (Celery drops it), or the worker died holding the
message (Redis brings it back only after the visibility timeout). The row says the job is
due, so the sweeper publishes it again; the claim makes any duplicate harmless.
"""
from __future__ import annotations

import datetime as dt
import logging
import os

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import aliased

from models import JobState, WritebackJob, utcnow
from models.db import session_scope
from models.enums import CLAIMABLE_STATES, TERMINAL_STATES
from tasks.store import db_retry

log = logging.getLogger("psa_writeback.sweeper")


def republish_after() -> dt.timedelta:
    return dt.timedelta(seconds=float(os.environ.get("SWEEP_REPUBLISH_AFTER_SECONDS", "120")))


@db_retry
def find_lost(limit: int = 500) -> list[tuple[int, str]]:
    """Due-but-unclaimed and lease-expired jobs, marked as published now (in the same short
    transaction, rows locked with SKIP LOCKED so two sweepers never take the same job)."""
    now = utcnow()
    stale = now - republish_after()
    J, other = WritebackJob, aliased(WritebackJob)
    earlier_live = exists().where(other.ticket_key == J.ticket_key, other.id < J.id,
                                  other.state.notin_([s.value for s in TERMINAL_STATES]))
    not_recent = or_(J.published_at.is_(None), J.published_at <= stale)
    due = and_(J.state.in_([s.value for s in CLAIMABLE_STATES]), J.next_attempt_at <= stale, not_recent,
               ~earlier_live)
    expired = and_(J.state == JobState.RUNNING.value, J.lease_until < now, not_recent)
    found: list[tuple[int, str]] = []
    with session_scope() as db:
        for condition, order in ((expired, J.lease_until), (due, J.next_attempt_at)):
            rows = db.execute(select(J.id, J.kind).where(condition).order_by(order).limit(limit - len(found))
                              .with_for_update(skip_locked=True, of=J)).all()
            found.extend((r.id, r.kind) for r in rows)
        if found:
            db.execute(update(J).where(J.id.in_([i for i, _ in found])).values(published_at=now))
    return found


def sweep(limit: int = 500) -> dict[str, int]:
    from tasks.enqueue import publish

    lost = find_lost(limit)
    published = sum(1 for job_id, kind in lost if publish(job_id, kind))
    if lost:
        log.warning("sweeper re-published %s of %s lost or stalled jobs", published, len(lost))
    return {"found": len(lost), "published": published}
