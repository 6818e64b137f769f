"""Accounts' settings and their PSA connections (credentials encrypted at rest)."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Boolean, ForeignKey, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, intpk, utcnow


class AccountSettings(Base):
    __tablename__ = "account_settings"

    account_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200), default="")
    # Free-form per-account preferences; the worker reads cw_resolved_status_id and
    # cw_escalated_status_id from here (board-specific, never defaulted).
    preferences: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PsaConnection(Base):
    __tablename__ = "psa_connections"

    id: Mapped[intpk]
    account_id: Mapped[int] = mapped_column(ForeignKey("account_settings.account_id"), index=True)
    provider: Mapped[str] = mapped_column(String(32))
    base_url: Mapped[str] = mapped_column(Text)
    company_id: Mapped[str] = mapped_column(String(100))
    client_id: Mapped[str] = mapped_column(String(100))
    # Fernet tokens, each bound to this row's id and base_url (models.crypto): a row changed in
    # the database makes the worker refuse them. Never logged, never sent as task arguments.
    public_key_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    private_key_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:  # keep credentials out of any accidental repr
        return f"<PsaConnection id={self.id} account={self.account_id} provider={self.provider}>"
