"""ConnectWise PSA (Manage) over REST apis/3.0.

Vendor quirks that shaped this module (see shared/reference/psa-apis.md §1):
- auth is Basic base64("company+public:private") plus a clientId header on every call;
- the API version is pinned in Accept, otherwise CW serves "latest" and fields drift;
- note visibility is three flags; only internalAnalysisFlag keeps a note from the customer;
- PATCH bodies are JSON Patch arrays; we use the sub-path form `status/id`, which is what
  CW's own errors name, and a status id from another board is a 400 on `status/id`;
- notes have no idempotency key, so callers reconcile with list_recent_notes (before the
  POST) and list_notes_after (after an unanswered one): note ids are increasing integers,
  and `conditions=id > N` with `pageSize` (at most 1000), re-asked from the last id of each
  full page (keyset, not `page=N`, so a deletion between reads cannot skip one), reads
  every newer note.
"""
from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Any

from models.enums import NoteVisibility
from providers.base import BoardStatus, Credentials, PostedNote, Ticket
from providers.errors import PsaProtocolError
from providers.http import call, pooled_session
from providers.text import NOTE_ID_LIMIT, STATUS_NAME_LIMIT, clean_line, clean_optional, clean_text
from providers.values import parse_iso, to_int, vendor_id

API_VERSION = os.environ.get("CW_API_VERSION", "2025.16")
TICKET_FIELDS = "id,status,closedFlag,board,_info"
NOTE_PAGE_SIZE = 1000  # CW's maximum pageSize
NOTE_PAGES_MAX = 20
# Vendor strings are cleaned of control characters and clamped here, at the boundary
# (providers.text): a status name goes to logs, alerts and terminals, and into String(200).

_FLAGS = {
    NoteVisibility.RESOLUTION: {"detailDescriptionFlag": False, "internalAnalysisFlag": False, "resolutionFlag": True},
    NoteVisibility.INTERNAL: {"detailDescriptionFlag": False, "internalAnalysisFlag": True, "resolutionFlag": False},
    NoteVisibility.DISCUSSION: {"detailDescriptionFlag": True, "internalAnalysisFlag": False, "resolutionFlag": False},
}


class ConnectWiseProvider:
    name = "connectwise"
    # account_settings.preferences keys: cw_resolved_status_id, cw_escalated_status_id
    preference_prefix = "cw"

    def __init__(self, credentials: Credentials, options: Mapping[str, Any] | None = None) -> None:
        # no option_keys: ConnectWise takes its settings from the connection and the ticket
        self._base = credentials.base_url.rstrip("/")
        token = f"{credentials.company_id}+{credentials.public_key}:{credentials.private_key}"
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(token.encode()).decode(),
            "clientId": credentials.client_id,
            "Accept": f"application/vnd.connectwise.com+json; version={API_VERSION}",
            "Content-Type": "application/json",
            "Cache-Control": "no-cache",
        }
        self._session = pooled_session(f"cw|{self._base}|{token}|{credentials.client_id}", self._base)

    def __repr__(self) -> str:
        return f"<ConnectWiseProvider {self._base}>"

    def _call(self, method: str, path: str, operation: str, **kwargs: Any) -> Any:
        return call(self._session, method, self._base + path, provider=self.name, operation=operation,
                    headers=self._headers, **kwargs)

    def get_ticket(self, ticket_id: int) -> Ticket:
        body = self._call("GET", f"/service/tickets/{ticket_id}", "get_ticket", params={"fields": TICKET_FIELDS})
        return _ticket(body)

    def update_status(self, ticket_id: int, status_id: int) -> Ticket:
        patch = [{"op": "replace", "path": "status/id", "value": status_id}]
        return _ticket(self._call("PATCH", f"/service/tickets/{ticket_id}", "update_status", json=patch))

    def post_note(self, ticket_id: int, text: str, visibility: NoteVisibility) -> PostedNote:
        body = {"text": text, **_FLAGS[visibility], "customerUpdatedFlag": False}
        if visibility is NoteVisibility.INTERNAL:
            body["processNotifications"] = False  # internal notes must never email anyone
        return _note(self._call("POST", f"/service/tickets/{ticket_id}/notes", "post_note", json=body))

    def list_recent_notes(self, ticket_id: int, limit: int = 50) -> list[PostedNote]:
        return _notes(self._call("GET", f"/service/tickets/{ticket_id}/notes", "list_notes",
                                 params={"orderBy": "id desc", "pageSize": min(max(limit, 1), 1000)}))

    def list_notes_after(self, ticket_id: int, after_id: str) -> list[PostedNote]:
        if not after_id.isdigit():
            raise ValueError(f"ConnectWise note ids are integers, got {after_id!r:.40}")
        # Keyset paging: each read is page 1 of `id > <last id seen>`. Offset paging (page=N)
        # would skip a note whenever one on an earlier page is deleted between the reads.
        notes: list[PostedNote] = []
        cursor = int(after_id)
        for _ in range(NOTE_PAGES_MAX):
            page = _notes(self._call("GET", f"/service/tickets/{ticket_id}/notes", "list_notes",
                                     params={"conditions": f"id > {cursor}", "orderBy": "id asc",
                                             "pageSize": NOTE_PAGE_SIZE, "page": 1}))
            notes += page
            if len(page) < NOTE_PAGE_SIZE:
                return notes
            last = to_int(page[-1].id)
            if last is None or last <= cursor:  # the condition was ignored: paging would never end
                raise PsaProtocolError(f"notes reply for ticket {ticket_id} did not honour id > {cursor}",
                                       operation="list_notes")
            cursor = last
        # Never guess: a reconcile that cannot see every candidate must not post again.
        raise PsaProtocolError(f"ticket {ticket_id} has more than {NOTE_PAGES_MAX * NOTE_PAGE_SIZE} notes newer "
                               f"than note {after_id}", operation="list_notes")

    def list_statuses(self, board_id: int) -> list[BoardStatus]:
        body = self._call("GET", f"/service/boards/{board_id}/statuses", "list_statuses",
                          params={"pageSize": 1000})
        if not isinstance(body, list):
            raise PsaProtocolError("statuses reply was not a list", operation="list_statuses")
        if not all(isinstance(s, dict) for s in body):
            raise PsaProtocolError("statuses reply held a status that is not an object", operation="list_statuses")
        return [BoardStatus(id=vendor_id(s.get("id"), "status", "list_statuses"),
                            name=clean_line(s.get("name", ""), STATUS_NAME_LIMIT), closed=bool(s.get("closedStatus")),
                            inactive=bool(s.get("inactive"))) for s in body]


def _ticket(body: Any) -> Ticket:
    if not isinstance(body, dict):
        raise PsaProtocolError("ticket reply had no id", operation="get_ticket")
    status = body.get("status") or {}
    board = body.get("board") or {}
    return Ticket(id=vendor_id(body.get("id"), "ticket reply", "get_ticket"), status_id=to_int(status.get("id")),
                  status_name=clean_optional(status.get("name"), STATUS_NAME_LIMIT),
                  board_id=to_int(board.get("id")), closed=body.get("closedFlag"))


def _notes(body: Any) -> list[PostedNote]:
    if not isinstance(body, list):
        raise PsaProtocolError("notes reply was not a list", operation="list_notes")
    return [_note(n) for n in body]


def _note(body: Any) -> PostedNote:
    if not isinstance(body, dict) or "id" not in body:
        raise PsaProtocolError("note reply had no id", operation="post_note")
    if body.get("internalAnalysisFlag"):
        vis = NoteVisibility.INTERNAL
    elif body.get("resolutionFlag"):
        vis = NoteVisibility.RESOLUTION
    elif body.get("detailDescriptionFlag"):
        vis = NoteVisibility.DISCUSSION
    else:
        vis = None
    created = body.get("dateCreated")
    note_id = str(body["id"])
    if len(note_id) > NOTE_ID_LIMIT or not note_id.isprintable():  # CW ids are integers
        raise PsaProtocolError("note reply had an id that is not a ConnectWise note id", operation="post_note")
    return PostedNote(id=note_id, text=clean_text(body.get("text") or ""), visibility=vis,
                      created_at=parse_iso(created) if created else None)
