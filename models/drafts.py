"""What Claude drafts from, and what it drafted: session transcripts, ticket context, previews.

The web app writes `ai_session_messages` and `ai_session_context` as the engineer works;
the drafting worker only reads them. `draft_previews` is the preview cache: one row per
(session, kind, state hash), so the same state is drafted once per kind, a changed state
gets a new row, and resolution and escalation previews of one state live side by side.
"""
from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigIntPK, intpk, utcnow


class DraftKind(str, enum.Enum):
    RESOLUTION = "resolution"  # customer-facing resolution note
    ESCALATION = "escalation"  # five-section internal handoff package


class DraftStatus(str, enum.Enum):
    PENDING = "pending"  # asked for; no execution has claimed it yet
    RUNNING = "running"  # claimed until lease_until
    SUCCEEDED = "succeeded"  # markdown is the preview; later asks for the same state are cache hits
    FAILED = "failed"  # error says why; asking again re-drafts
    SUPERSEDED = "superseded"  # the session changed before this state was drafted


CLAIMABLE_DRAFT_STATES = frozenset({DraftStatus.PENDING, DraftStatus.FAILED})


class AiSessionMessage(Base):
    """One turn of a troubleshooting session's transcript, in order."""
    __tablename__ = "ai_session_messages"
    __table_args__ = (UniqueConstraint("session_id", "position"),)

    id: Mapped[intpk]
    session_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("ai_sessions.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    # Free text on purpose (engineer, assistant, tool, customer, ...): it is shown to the
    # model as a label inside the transcript data, never used as an API message role.
    role: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)
    # The web app writes these rows: a server default lets its INSERT name only the
    # documented columns (migration 0007).
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())


class AiSessionContext(Base):
    """Ticket facts the drafts need beyond the transcript (one row per session, optional)."""
    __tablename__ = "ai_session_context"

    session_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("ai_sessions.id", ondelete="CASCADE"),
                                            primary_key=True, autoincrement=False)
    ticket_summary: Mapped[str | None] = mapped_column(Text)  # the PSA ticket's summary line
    ticket_description: Mapped[str | None] = mapped_column(Text)  # the customer's original report
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow, server_default=func.now())


class DraftPreview(Base):
    __tablename__ = "draft_previews"
    __table_args__ = (UniqueConstraint("session_id", "kind", "state_hash"),)

    id: Mapped[intpk]
    # No separate index on session_id: the unique constraint leads with it.
    session_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("ai_sessions.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    state_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the drafting input
    status: Mapped[str] = mapped_column(String(16), default=DraftStatus.PENDING.value)
    markdown: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    prompt_version: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(100))  # as reported by the API
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    api_calls: Mapped[int] = mapped_column(Integer, default=0)  # HTTP requests, retries and re-asks included
    duration_ms: Mapped[int | None]
    task_id: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    completed_at: Mapped[dt.datetime | None]
