"""Writeback intent (one row per job) and its executions (one row per attempt).

The job row is the source of truth; Celery messages only say "look at job N".
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, intpk, utcnow
from models.enums import AttemptOutcome, JobState, NoteState

ERROR_MESSAGE_LIMIT = 2000

# A session has at most one live (not failed, not cancelled) resolve and one escalate:
# enforced by the database so two racing web requests cannot both enqueue.
_LIVE_WRITEBACK = "kind IN ('resolve', 'escalate') AND state NOT IN ('failed', 'cancelled')"


class WritebackJob(Base):
    __tablename__ = "writeback_jobs"
    __table_args__ = (
        Index(
            "uq_writeback_jobs_live_session_kind",
            "session_id",
            "kind",
            unique=True,
            postgresql_where=text(_LIVE_WRITEBACK),
            sqlite_where=text(_LIVE_WRITEBACK),
        ),
        # The sweeper's and the claim's access paths.
        Index("ix_writeback_jobs_due", "next_attempt_at", postgresql_where=text("state IN ('queued', 'retrying')")),
        Index("ix_writeback_jobs_lease", "lease_until", postgresql_where=text("state = 'running'")),
        # Idempotency keys are scoped per account: another tenant reusing `order-1` neither
        # collides with nor learns anything about this one's job.
        UniqueConstraint("account_id", "idempotency_key", name="uq_writeback_jobs_account_idempotency_key"),
        Index("ix_writeback_jobs_ticket_key_id", "ticket_key", "id"),
        Index("ix_writeback_jobs_state_created", "state", "created_at"),
        # Fair scheduling: an account's live backlog, counted at enqueue (tasks.enqueue.fair_priority).
        Index("ix_writeback_jobs_account_live", "account_id",
              postgresql_where=text("state IN ('queued', 'retrying', 'running')")),
    )

    id: Mapped[intpk]
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32), default=JobState.QUEUED.value)
    # Unique per account (uq_writeback_jobs_account_idempotency_key): tenants' keys never meet.
    idempotency_key: Mapped[str] = mapped_column(String(255))

    session_id: Mapped[int] = mapped_column(ForeignKey("ai_sessions.id"), index=True)
    account_id: Mapped[int] = mapped_column(index=True)
    psa_connection_id: Mapped[int | None] = mapped_column(ForeignKey("psa_connections.id"))
    provider: Mapped[str | None] = mapped_column(String(32))
    ticket_id: Mapped[int | None] = mapped_column(index=True)
    # Jobs with the same key run one at a time, in id order ("conn:ticket" or "session:N").
    ticket_key: Mapped[str] = mapped_column(String(100))

    markdown: Mapped[str | None] = mapped_column(Text)
    note_visibility: Mapped[str | None] = mapped_column(String(32))
    target_status_id: Mapped[int | None]
    transition_skipped_reason: Mapped[str | None] = mapped_column(Text)

    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=8)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[dt.datetime | None]
    published_at: Mapped[dt.datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(255))

    # Progress of the note step, committed before and after the POST (see tasks.steps).
    note_state: Mapped[str] = mapped_column(String(16), default=NoteState.NONE.value)
    note_baseline_ids: Mapped[list[Any] | None] = mapped_column(JSON)
    # The newest note id on the ticket when the intent was recorded ("0": it had none); a
    # later execution looks for our note among every note newer than this, however many.
    note_watermark_id: Mapped[str | None] = mapped_column(String(64))
    note_external_id: Mapped[str | None] = mapped_column(String(64))
    note_posted_at: Mapped[dt.datetime | None]
    note_adopted: Mapped[bool] = mapped_column(default=False)

    expected_status_id: Mapped[int | None]
    expected_status_name: Mapped[str | None] = mapped_column(String(200))
    observed_status_id: Mapped[int | None]
    observed_status_name: Mapped[str | None] = mapped_column(String(200))
    status_patched: Mapped[bool] = mapped_column(default=False)
    verified_at: Mapped[dt.datetime | None]

    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)

    def __repr__(self) -> str:
        return f"<WritebackJob id={self.id} kind={self.kind} state={self.state}>"


class WritebackAttempt(Base):
    __tablename__ = "writeback_attempts"
    __table_args__ = (UniqueConstraint("job_id", "attempt_no", name="uq_writeback_attempts_job_attempt"),)

    id: Mapped[intpk]
    job_id: Mapped[int] = mapped_column(ForeignKey("writeback_jobs.id", ondelete="CASCADE"), index=True)
    attempt_no: Mapped[int]
    celery_task_id: Mapped[str | None] = mapped_column(String(255))
    worker: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    duration_ms: Mapped[int | None]
    # Of duration_ms, the time spent waiting on the PSA's replies (None: no PSA call made):
    # tells a slow PSA from a slow worker.
    psa_ms: Mapped[int | None]
    outcome: Mapped[str] = mapped_column(String(32), default=AttemptOutcome.RUNNING.value)
    step: Mapped[str | None] = mapped_column(String(32))
    http_status: Mapped[int | None]
    error_type: Mapped[str | None] = mapped_column(String(100))
    # Cut to ERROR_MESSAGE_LIMIT; vendor messages only, never request headers or bodies.
    error_message: Mapped[str | None] = mapped_column(Text)
