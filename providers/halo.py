"""HaloPSA over REST /api with OAuth2 client credentials.

Vendor quirks that shaped this module (see shared/reference/psa-apis.md §3):
- the token URL is not fixed: `GET /api/authinfo` names the auth server (`auth_url`), and
  hosted instances add `?tenant=`; tokens live `expires_in` seconds, so one is cached per
  connection and shared by the worker's threads (providers.halo_tokens), renewed shortly
  before it expires, and renewed once more when the API answers 401 (revoked early)
  before the call counts as an auth failure. The token is never logged or put in errors;
- a note is an Action, posted as a JSON *array*: customer visible = `hiddenfromuser`
  false, internal = true; `sendemail` is false unless the account asks (`halo_send_email`);
  the action's `outcome` names its type and is configurable per account;
- a status change is `POST /api/Tickets [{"id","status_id"}]` (POST with an id updates);
  the re-read is `GET /api/Tickets/{id}`; statuses are tenant-wide (`GET /api/Status`);
- actions are listed per ticket with `page_no`/`page_size` and no "id greater than"
  filter, so both note listings read the ticket's actions in full (bounded) and keep
  those newer than the watermark; action ids grow per ticket.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from models.enums import NoteVisibility
from providers import errors as E
from providers.base import BoardStatus, Credentials, PostedNote, Ticket
from providers.errors import PsaProtocolError
from providers.halo_tokens import TOKENS, TokenSource
from providers.http import call, pooled_session
from providers.picklists import PICKLISTS, Picklist
from providers.text import STATUS_NAME_LIMIT, clean_line, clean_text
from providers.values import to_int, vendor_id

ACTION_PAGE_SIZE = 100
ACTION_PAGES_MAX = 50
TENANT_BOARD = 0  # Halo statuses belong to the tenant, not a board
# Default outcomes (action types) per visibility: UNCONFIRMED names, overridable per account.
OUTCOMES = {NoteVisibility.RESOLUTION: "Resolution", NoteVisibility.DISCUSSION: "Note",
            NoteVisibility.INTERNAL: "Private Note"}
CLOSED_NAMES = {"closed", "resolved", "completed", "complete", "cancelled"}


def _same_origin(url: str, base: str) -> bool:
    def origin(u: str) -> tuple[str, str | None, int | None]:
        parts = urlsplit(u)
        scheme = parts.scheme.lower()
        return scheme, parts.hostname, parts.port or {"https": 443, "http": 80}.get(scheme)
    return origin(url) == origin(base)


class HaloProvider:
    name = "halo"
    # account_settings.preferences keys: halo_resolved_status_id, halo_escalated_status_id
    preference_prefix = "halo"
    # company_id holds the tenant (hosted instances only); there is no public key
    optional_credentials = ("company_id", "public_key")
    option_keys = ("halo_send_email", "halo_outcome_resolution", "halo_outcome_discussion",
                   "halo_outcome_internal")

    def __init__(self, credentials: Credentials, options: Mapping[str, Any] | None = None) -> None:
        self._base = credentials.base_url.rstrip("/")
        if self._base.endswith("/api"):
            self._base = self._base[:-4]
        self._tenant = credentials.company_id.strip()
        secret = f"{credentials.client_id}|{credentials.private_key}"
        self._session = pooled_session(f"halo|{self._base}|{self._tenant}|{secret}", self._base)
        self._tokens: TokenSource = TOKENS.source(
            f"halo|{self._base}|{self._tenant}|{secret}",
            lambda: self._fetch_token(credentials.client_id, credentials.private_key))
        self._cache_key = f"halo|{self._base}|{self._tenant}|{credentials.client_id}"
        self._options = dict(options or {})

    def __repr__(self) -> str:
        return f"<HaloProvider {self._base}>"

    # --- auth -------------------------------------------------------------------------------
    def _fetch_token(self, client_id: str, client_secret: str) -> tuple[str, float]:
        info = call(self._session, "GET", self._base + "/api/authinfo", provider=self.name, operation="token",
                    headers={"Accept": "application/json"})
        auth_url = info.get("auth_url") if isinstance(info, dict) else None
        token_url = (str(auth_url).rstrip("/") if auth_url else self._base + "/auth") + "/token"
        if not _same_origin(token_url, self._base):
            # The reply is the PSA's (or anything in the path): the client secret goes only to
            # the connection's own vetted host, never to an auth server a reply names elsewhere.
            raise E.PsaPermanentError("the PSA's /api/authinfo names an auth server on another host; the client "
                                      "secret is only sent to the connection's own host", operation="token")
        params = {"tenant": self._tenant} if self._tenant else None
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret,
                "scope": "all"}
        try:
            body = call(self._session, "POST", token_url, provider=self.name, operation="token",
                        headers={"Accept": "application/json"}, data=form, params=params)
        except (E.PsaBadRequest, E.PsaAuthError, E.PsaPermissionDenied) as err:
            # OAuth servers say "invalid_client" with a 400 or a 401: both mean the keys.
            raise E.PsaAuthError(f"the token endpoint refused the client credentials: {err.message}",
                                 status_code=err.status_code, operation="token") from None
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise PsaProtocolError("token reply had no access_token", operation="token")
        try:
            lifetime = float(body.get("expires_in") or 3600)
        except (TypeError, ValueError):
            lifetime = 3600.0
        # the server's number: a negative, NaN or absurd one must not mean a token per call
        return token, min(max(lifetime, 1.0), 86_400.0) if math.isfinite(lifetime) else 3600.0

    def _call(self, method: str, path: str, operation: str, **kwargs: Any) -> Any:
        token = self._tokens.get()
        try:
            return self._send(token, method, path, operation, **kwargs)
        except E.PsaAuthError:
            # A token revoked or expired early: renew once; a second 401 is the keys.
            return self._send(self._tokens.renew(token), method, path, operation, **kwargs)

    def _send(self, token: str, method: str, path: str, operation: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
                   "Content-Type": "application/json"}
        return call(self._session, method, self._base + path, provider=self.name, operation=operation,
                    headers=headers, **kwargs)

    # --- the Provider interface ---------------------------------------------------------------
    def get_ticket(self, ticket_id: int) -> Ticket:
        return self._ticket(self._call("GET", f"/api/Tickets/{ticket_id}", "get_ticket"))

    def update_status(self, ticket_id: int, status_id: int) -> Ticket:
        body = self._call("POST", "/api/Tickets", "update_status", json=[{"id": ticket_id, "status_id": status_id}])
        reply = body[0] if isinstance(body, list) and body else body
        if isinstance(reply, dict) and reply.get("id") is not None:
            return self._ticket(reply)
        return Ticket(id=ticket_id, status_id=status_id, status_name=None, board_id=TENANT_BOARD)

    def post_note(self, ticket_id: int, text: str, visibility: NoteVisibility) -> PostedNote:
        internal = visibility is NoteVisibility.INTERNAL
        action = {"ticket_id": ticket_id, "note": text, "hiddenfromuser": internal,
                  "outcome": self._outcome(visibility),
                  # internal notes never email anyone; customer-visible ones only if asked
                  "sendemail": (not internal) and self._options.get("halo_send_email") is True}
        body = self._call("POST", "/api/Actions", "post_note", json=[action])
        reply = body[0] if isinstance(body, list) and body else body
        action_id = vendor_id(reply.get("id") if isinstance(reply, dict) else None, "action reply", "post_note")
        return PostedNote(id=str(action_id), text=text, visibility=visibility)

    def list_recent_notes(self, ticket_id: int, limit: int = 50) -> list[PostedNote]:
        notes = self._all_actions(ticket_id)
        return list(reversed(notes[-max(limit, 1):]))

    def list_notes_after(self, ticket_id: int, after_id: str) -> list[PostedNote]:
        if not after_id.isdigit():
            raise ValueError(f"Halo action ids are integers, got {after_id!r:.40}")
        return [n for n in self._all_actions(ticket_id) if int(n.id) > int(after_id)]

    def list_statuses(self, board_id: int = TENANT_BOARD) -> list[BoardStatus]:
        """The tenant's statuses (`board_id` is ignored: Halo statuses are tenant-wide)."""
        return [BoardStatus(id=v, name=name, closed=_closed(name), inactive=not active)
                for v, (name, active) in self._statuses().values.items()]

    # --- helpers --------------------------------------------------------------------------------
    def _outcome(self, visibility: NoteVisibility) -> str:
        override = self._options.get(f"halo_outcome_{visibility.value}")
        return override if isinstance(override, str) and override.strip() else OUTCOMES[visibility]

    def _statuses(self) -> Picklist:
        def load() -> dict[str, Picklist]:
            body = self._call("GET", "/api/Status", "list_statuses")
            rows = body.get("statuses", body.get("records")) if isinstance(body, dict) else body
            if not isinstance(rows, list):
                raise PsaProtocolError("statuses reply was not a list", operation="list_statuses")
            values = {sid: (clean_line(s.get("name") or "", STATUS_NAME_LIMIT), not s.get("inactive", False))
                      for s in rows if isinstance(s, dict) and (sid := to_int(s.get("id"))) is not None}
            return {"status": Picklist("Status", values)}
        return PICKLISTS.get(self._cache_key + "|Status", load, "status")

    def _ticket(self, body: Any) -> Ticket:
        if not isinstance(body, dict):
            raise PsaProtocolError("ticket reply had no id", operation="get_ticket")
        ticket_id = vendor_id(body.get("id"), "ticket reply", "get_ticket")
        status = to_int(body.get("status_id"))
        raw = body.get("status_name")
        name = clean_line(raw, STATUS_NAME_LIMIT) if isinstance(raw, str) else None
        if not name and status is not None:
            try:
                name = self._statuses().label(status)
            except E.PsaRateLimited:
                raise  # the PSA asks us to slow down: the runner's cooldown, not another call soon
            except E.PsaError:
                name = None  # a courtesy: the id is what we verify
        closed = body.get("hasbeenclosed")
        return Ticket(id=ticket_id, status_id=status, status_name=name, board_id=TENANT_BOARD,
                      closed=bool(closed) if closed is not None else None)

    def _all_actions(self, ticket_id: int) -> list[PostedNote]:
        discussion = self._outcome(NoteVisibility.DISCUSSION)
        seen: dict[str, PostedNote] = {}
        for page_no in range(1, ACTION_PAGES_MAX + 1):
            body = self._call("GET", "/api/Actions", "list_notes", params={
                "ticket_id": ticket_id, "excludesys": "true", "pageinate": "true", "page_size": ACTION_PAGE_SIZE,
                "page_no": page_no})
            rows = body.get("actions") if isinstance(body, dict) else None
            if not isinstance(rows, list):
                raise PsaProtocolError("actions reply had no actions list", operation="list_notes")
            for row in rows:
                note = _note(row, discussion)
                seen[note.id] = note
            total = to_int(body.get("record_count"))
            if len(rows) < ACTION_PAGE_SIZE or total is None or len(seen) >= total:
                return sorted(seen.values(), key=lambda n: int(n.id))
        # Never guess: a reconcile that cannot see every candidate must not post again.
        raise PsaProtocolError(f"ticket {ticket_id} has more than {ACTION_PAGES_MAX * ACTION_PAGE_SIZE} actions",
                               operation="list_notes")


def map_error(status: int, body: Any, operation: str | None = None) -> E.PsaError | None:
    """The token endpoint's OAuth replies ({"error": "invalid_client", "error_description":
    ...}, 400 or 401) say the keys or the tenant are wrong: an auth failure, with the
    server's reason. Only for the token call: an API 400 is the request's fault, and must
    not renew the token, send a note again or page about the keys."""
    if (operation != "token" or status not in (400, 401) or not isinstance(body, dict)
            or not isinstance(body.get("error"), str)):
        return None
    reason = body["error"] + (f" ({body['error_description']})" if isinstance(body.get("error_description"), str)
                              else "")
    return E.PsaAuthError(clean_line(reason, E.BODY_EXCERPT_LIMIT), status_code=status)


E.register_mapping("halo", map_error)


def _note(row: Any, discussion_outcome: str) -> PostedNote:
    if not isinstance(row, dict):
        raise PsaProtocolError("action had no id", operation="list_notes")
    action_id = vendor_id(row.get("id"), "action", "list_notes")
    if row.get("hiddenfromuser"):
        vis = NoteVisibility.INTERNAL
    elif str(row.get("outcome") or "") == discussion_outcome:
        vis = NoteVisibility.DISCUSSION
    else:
        vis = NoteVisibility.RESOLUTION
    return PostedNote(id=str(action_id), text=clean_text(row.get("note") or ""), visibility=vis)


def _closed(name: str) -> bool:
    return name.strip().lower() in CLOSED_NAMES
