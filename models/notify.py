"""PostgreSQL NOTIFY channels that tell the web tier a row reached its outcome.

A waiting web request (tasks.outcome_wait) LISTENs instead of polling. The notification is
sent inside the transaction that writes the outcome: PostgreSQL delivers it only when that
transaction commits (never for one that rolls back), so a waiter woken by it always reads
the committed outcome. The payload is the row id only: the row is the truth, and a payload
can never carry more than the waiter may see by reading the row itself.
"""
from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

JOB_CHANNEL = "psa_writeback_job"  # payload: writeback_jobs.id, once the job is terminal
PREVIEW_CHANNEL = "psa_writeback_preview"  # payload: draft_previews.id, once the draft is done
CHANNELS = (JOB_CHANNEL, PREVIEW_CHANNEL)


def notify(db: Session | Connection, channel: str, row_id: int) -> None:
    """NOTIFY `channel` with `row_id`, delivered when db's transaction commits. SQLite has no
    NOTIFY: its waiters poll, so this does nothing there."""
    bind = db if isinstance(db, Connection) else db.get_bind()
    if bind.dialect.name == "postgresql":
        db.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": str(row_id)})
