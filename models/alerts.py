"""Operations: alerts (one per job and kind, one open per PSA connection for auth) and the
operator actions taken on jobs (retry, reverify, cancel), kept as an audit trail.

Deduplication lives in the database, not in the worker's memory: a redelivered message, a
retried job, two worker threads or the beat-driven reconciler may all try to raise the same
alert; the partial unique indexes let exactly one INSERT win, and only the winner logs,
pages and enqueues the webhook.
"""
from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text, text, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.base import BigIntPK, Base, intpk, utcnow


class AlertKind(str, enum.Enum):
    VERIFICATION_FAILED = "verification_failed"  # the PSA accepted the status change, the re-read disagrees
    JOB_FAILED = "job_failed"  # a job ended failed (retries exhausted or a permanent error)
    AUTH_FAILED = "auth_failed"  # a connection's credentials stopped working (per connection)
    JOB_STUCK = "job_stuck"  # due (or its lease expired) and not started for too long, or due absurdly far out
    # a PSA's Retry-After (or our limiter) parks a job or its connection beyond LONG_DEFERRAL_ALERT_SECONDS
    LONG_DEFERRAL = "long_deferral"


class DeliveryState(str, enum.Enum):
    PENDING = "pending"  # the webhook task is queued or waiting to retry
    SENT = "sent"
    FAILED = "failed"  # gave up after the bounded retries (the ERROR log line and the row remain)
    DISABLED = "disabled"  # no ALERT_WEBHOOK_URL configured when the alert was raised


# Auth alerts are per connection; every other kind is per job.
_PER_JOB = "kind <> 'auth_failed'"
_OPEN_AUTH = "kind = 'auth_failed' AND resolved_at IS NULL"


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        Index("uq_alerts_job_kind", "job_id", "kind", unique=True,
              postgresql_where=text(_PER_JOB), sqlite_where=text(_PER_JOB)),
        Index("uq_alerts_open_auth_connection", "connection_id", unique=True,
              postgresql_where=text(_OPEN_AUTH), sqlite_where=text(_OPEN_AUTH)),
        Index("ix_alerts_created_at", "created_at"),
        Index("ix_alerts_delivery_pending", "delivery_next_at",
              postgresql_where=text("delivery_state = 'pending'")),
    )

    id: Mapped[intpk]
    kind: Mapped[str] = mapped_column(String(32))
    # For auth alerts: the first job that hit the dead credentials.
    job_id: Mapped[int | None] = mapped_column(ForeignKey("writeback_jobs.id", ondelete="SET NULL"), index=True)
    job_kind: Mapped[str | None] = mapped_column(String(32))
    account_id: Mapped[int | None] = mapped_column(index=True)
    provider: Mapped[str | None] = mapped_column(String(32))
    connection_id: Mapped[int | None] = mapped_column(BigIntPK)  # no FK: the alert outlives the connection
    ticket_id: Mapped[int | None] = mapped_column(index=True)
    expected_status_id: Mapped[int | None]
    expected_status_name: Mapped[str | None] = mapped_column(String(200))
    observed_status_id: Mapped[int | None]
    observed_status_name: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any] | None]

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[dt.datetime | None]
    resolution: Mapped[str | None] = mapped_column(Text)

    delivery_state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value)
    delivery_attempts: Mapped[int] = mapped_column(default=0)
    delivery_next_at: Mapped[dt.datetime | None]  # when the next delivery is due (the reconciler's clock)
    delivery_lease_until: Mapped[dt.datetime | None]  # one delivery in flight at a time
    delivery_status_code: Mapped[int | None]
    delivery_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[dt.datetime | None]


def close_alerts(db: Session, *conditions: Any, resolution: str) -> int:
    """Resolve the open alerts matching every condition, in the caller's transaction (one
    UPDATE); returns how many were closed."""
    return db.execute(update(Alert).where(Alert.resolved_at.is_(None), *conditions)
                      .values(resolved_at=utcnow(), resolution=resolution[:500])).rowcount


class JobAction(Base):
    """An operator's retry / reverify / cancel of a job: who, when, from and to which state."""
    __tablename__ = "writeback_job_actions"

    id: Mapped[intpk]
    job_id: Mapped[int] = mapped_column(ForeignKey("writeback_jobs.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200), default="")
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any] | None]
