"""The provider interface every PSA module implements, and the values it returns."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from models.enums import NoteVisibility


@dataclass(frozen=True)
class Ticket:
    id: int
    status_id: int | None
    status_name: str | None
    board_id: int | None = None
    closed: bool | None = None


@dataclass(frozen=True)
class PostedNote:
    id: str
    text: str
    visibility: NoteVisibility | None
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class BoardStatus:
    id: int
    name: str
    closed: bool = False
    inactive: bool = False


@dataclass(frozen=True)
class Credentials:
    """Decrypted only in the worker, only for the call; repr hides the keys."""
    base_url: str
    company_id: str
    client_id: str
    public_key: str
    private_key: str

    def __repr__(self) -> str:
        return f"Credentials(base_url={self.base_url!r}, company_id={self.company_id!r}, keys=<hidden>)"


class CallObserver(Protocol):
    def __call__(self, *, provider: str, operation: str, status: int | None, seconds: float,
                 error: str | None) -> None: ...


class Provider(Protocol):
    name: str

    def get_ticket(self, ticket_id: int) -> Ticket: ...

    def post_note(self, ticket_id: int, text: str, visibility: NoteVisibility) -> PostedNote: ...

    def update_status(self, ticket_id: int, status_id: int) -> Ticket: ...

    def list_recent_notes(self, ticket_id: int, limit: int = 50) -> list[PostedNote]: ...

    def list_notes_after(self, ticket_id: int, after_id: str) -> list[PostedNote]:
        """Every note newer than `after_id` (a note id from list_recent_notes, or "0"), however
        many, oldest first. Only for PSAs whose note ids are increasing integers."""
        ...

    def list_statuses(self, board_id: int) -> list[BoardStatus]: ...
