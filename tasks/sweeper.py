"""The beat-driven safety net: re-publish jobs whose message was lost.

A job can be due with no message for it in the broker: the publish after commit failed
(Redis down), a retry's publish failed (Celery drops it), Redis restarted empty, or the
worker died holding the message (Redis brings it back only after the visibility timeout).
The row says the job is due, so the sweeper publishes it again; the claim makes any
duplicate harmless.

Harmless is not free, though. A due job whose message is simply still waiting in a long
queue looks exactly like a lost one. Re-publishing every such job each window during a
backlog (a burst, a catch-up after an outage) would double the queue every window, just
when the workers are busiest. So while the writeback queue is not empty, a due job is
only re-published once it has waited far longer (SWEEP_BACKLOG_REPUBLISH_AFTER_SECONDS);
lease-expired running jobs are always taken (their message is not in the queue), and so
are due jobs that were never given a message to wait for (published_at empty: a job waiting
for a PSA connection's in-flight slot, whose wake-up was lost), after the normal wait.
"""
from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import aliased

from models import JobState, WritebackJob, settings, utcnow
from models.db import session_scope
from models.enums import CLAIMABLE_STATES, TERMINAL_STATES
from tasks.store import db_retry

log = logging.getLogger("psa_writeback.sweeper")

QUEUE = "writeback"


def republish_after() -> dt.timedelta:
    return dt.timedelta(seconds=settings.number("SWEEP_REPUBLISH_AFTER_SECONDS", 120, minimum=0))


def backlog_republish_after() -> dt.timedelta:
    default = 10 * republish_after().total_seconds()
    return dt.timedelta(seconds=settings.number("SWEEP_BACKLOG_REPUBLISH_AFTER_SECONDS", default, minimum=0))


def broker_queue_lengths(*queues: str) -> dict[str, int]:
    """Messages waiting in each queue, over one broker connection; raises when the broker
    cannot be reached. The transport counts: with Redis, kombu sums the queue's list for
    every priority step (tasks.enqueue's fair priorities land in those lists), so no list
    name is spelled out here, and a queue nobody has used yet counts 0. Also read by
    worker.metrics.

    Not a passive declare: kombu's Redis transport answers "does it exist" with an EXISTS
    that ignores global_keyprefix (CELERY_REDIS_KEY_PREFIX), so with a prefix every queue
    looked missing and counted 0. A plain declare on a virtual transport (Redis, the
    filesystem broker) writes nothing to the broker; it only counts."""
    from worker.app import app

    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=5)
        channel = conn.default_channel
        return {queue: int(channel.queue_declare(queue=queue).message_count) for queue in queues}


def queue_depth() -> int | None:
    """Messages waiting in the writeback queue, or None when the broker cannot say (it is
    down, or the transport does not count): then every due job counts as possibly lost."""
    try:
        return broker_queue_lengths(QUEUE)[QUEUE]
    except Exception as err:
        log.info("cannot read the depth of queue %s (%s); treating every due job as possibly lost", QUEUE,
                 type(err).__name__)
        return None


@db_retry
def find_lost(limit: int = 500, backlog: bool = False) -> list[tuple[int, str]]:
    """Due-but-unclaimed and lease-expired jobs, marked as published now (in the same short
    transaction, rows locked with SKIP LOCKED so two sweepers never take the same job)."""
    now = utcnow()
    stale = now - (backlog_republish_after() if backlog else republish_after())
    J, other = WritebackJob, aliased(WritebackJob)
    earlier_live = exists().where(other.ticket_key == J.ticket_key, other.id < J.id,
                                  other.state.notin_([s.value for s in TERMINAL_STATES]))
    # A job without published_at has no message anywhere (the queue's length says nothing about
    # it); one with a message in a long queue waits for `stale`.
    no_message = now - republish_after()
    due = and_(J.state.in_([s.value for s in CLAIMABLE_STATES]), J.next_attempt_at <= no_message,
               or_(J.published_at.is_(None), and_(J.next_attempt_at <= stale, J.published_at <= stale)),
               ~earlier_live)
    not_recent = or_(J.published_at.is_(None), J.published_at <= now - republish_after())
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

    depth = queue_depth()
    lost = find_lost(limit, backlog=bool(depth))
    published = sum(1 for job_id, kind in lost if publish(job_id, kind))
    if lost:
        log.warning("sweeper re-published %s of %s lost or stalled jobs (queue depth %s)", published, len(lost),
                    "unknown" if depth is None else depth)
    return {"found": len(lost), "published": published, "queue_depth": -1 if depth is None else depth}
