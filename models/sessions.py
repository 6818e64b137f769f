"""Troubleshooting sessions, as the web app stores them, plus the writeback result columns."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, intpk, utcnow
from models.enums import SessionStatus


class AiSession(Base):
    __tablename__ = "ai_sessions"

    id: Mapped[intpk]
    account_id: Mapped[int] = mapped_column(ForeignKey("account_settings.account_id"), index=True)
    psa_connection_id: Mapped[int | None] = mapped_column(ForeignKey("psa_connections.id"))
    psa_ticket_id: Mapped[int | None]
    title: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(32), default=SessionStatus.OPEN.value)

    resolution_note_markdown: Mapped[str | None] = mapped_column(Text)
    resolution_note_posted_at: Mapped[dt.datetime | None]
    resolution_note_external_id: Mapped[str | None] = mapped_column(String(64))
    escalation_package_markdown: Mapped[str | None] = mapped_column(Text)
    escalation_package_posted_at: Mapped[dt.datetime | None]
    escalation_package_external_id: Mapped[str | None] = mapped_column(String(64))

    psa_status_id: Mapped[int | None]
    psa_status_name: Mapped[str | None] = mapped_column(String(200))
    psa_status_verified_at: Mapped[dt.datetime | None]

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
