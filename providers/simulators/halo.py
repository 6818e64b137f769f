"""A HaloPSA simulator on loopback: OAuth2 client credentials and the /api endpoints
providers.halo uses.

`GET /api/authinfo` names the auth server; `POST /auth/token?tenant=` issues bearer
tokens for the right client id, secret and tenant, which expire after `token_ttl`
seconds (or at once with `expire_tokens()`), after which the API answers 401. Actions
(notes) are posted as JSON arrays and listed newest first with page_no/page_size;
statuses belong to the tenant (ids unlike the other simulators' on purpose); a refused
update is a 400 with Halo's plain-text message. Fault rules (operations get_ticket,
update_status, post_note, list_notes, list_statuses, token) and `reject_status_changes`
work as in the ConnectWise simulator.

Run it alone: `python -m providers.simulators.halo` (or `psa-writeback simulator
--provider halo`); control it over HTTP under `/_sim/`.
"""
from __future__ import annotations

import datetime as dt
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from providers.simulators.common import FaultingHandler, QuietServer, Reply, run_main
from providers.simulators.connectwise import SimState

TENANT_STATUSES = {1: ("New", False), 2: ("In Progress", False), 22: ("Escalated to 2nd Line", False),
                   18: ("Waiting on User", False), 9: ("Closed", True)}


@dataclass
class HaloState(SimState):
    tenant: str = "simtenant"
    client_id: str = "fake-halo-client-id"
    client_secret: str = "fake-halo-client-secret"
    token_ttl: float = 3600.0
    auth_url: str | None = None  # what /api/authinfo names (None: this server's /auth)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> monotonic expiry
    boards: dict[int, dict[int, tuple[str, bool]]] = field(default_factory=lambda: {0: dict(TENANT_STATUSES)})
    # Some Halo versions leave status_name out of a ticket: the provider reads the status list
    omit_status_name: bool = False

    def add_ticket(self, ticket_id: int, *, board_id: int = 0, status_id: int = 1,
                   reject_status_changes: bool = False) -> None:
        super().add_ticket(ticket_id, board_id=0, status_id=status_id, reject_status_changes=reject_status_changes)
        with self.lock:
            self.tickets[ticket_id]["next_action"] = 0

    def add_note(self, ticket_id: int, text: str, *, internal: bool = False) -> int:
        with self.lock:
            return _new_action(self.tickets[ticket_id], {"note": text, "hiddenfromuser": internal,
                                                         "outcome": "Private Note" if internal else "Note",
                                                         "sendemail": False, "who": "A Technician"})

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens = {t: 0.0 for t in self.tokens}


def _new_action(ticket: dict[str, Any], fields: dict[str, Any]) -> int:
    # Halo numbers actions per ticket: 1, 2, 3...
    ticket["next_action"] += 1
    ticket["notes"].append({"id": ticket["next_action"], "ticket_id": ticket["id"],
                            "datetime": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f"),
                            **fields})
    return ticket["next_action"]


class _Handler(FaultingHandler):
    server: "HaloSimulator"

    def dispatch(self, method: str, path: str, query: str, body: Any) -> None:
        if path == "/api/authinfo" and method == "GET":
            auth_url = self.server.state.auth_url or self.server.root_url + "/auth"
            return self.send(200, {"auth_url": auth_url, "tenant_id": self.server.state.tenant,
                                   "auth_method": 0})
        if path == "/auth/token" and method == "POST":
            return self.serve("token", None, authorised=lambda: None, apply=lambda: self._token(body, query),
                              error_body=_error_body)
        route = _route(method, path)
        if route is None:
            return self.send(404, f"no route {method} {path}")
        operation, ticket_id = route
        if operation in ("update_status", "post_note") and isinstance(body, list) and body \
                and isinstance(body[0], dict):  # the ticket is named in the body (fault rules match it)
            ticket_id = body[0].get("id" if operation == "update_status" else "ticket_id")
        return self.serve(operation, ticket_id, authorised=self._authorised,
                          apply=lambda: self._apply(operation, ticket_id, body, query), error_body=_error_body)

    def _authorised(self) -> Reply | None:
        st = self.server.state
        header = self.headers.get("Authorization") or ""
        token = header[7:] if header.startswith("Bearer ") else None
        with st.lock:
            expiry = st.tokens.get(token or "")
        if expiry is not None and time.monotonic() < expiry:
            return None
        return 401, {"message": "Unauthorized", "error": "invalid_token" if expiry is None else "token_expired"}

    def _token(self, body: Any, query: str) -> Reply:
        st = self.server.state
        form = urllib.parse.parse_qs(body if isinstance(body, str) else "")
        tenant = urllib.parse.parse_qs(query).get("tenant", [""])[0]
        get = lambda k: form.get(k, [""])[0]  # noqa: E731
        if get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        if (get("client_id"), get("client_secret"), tenant) != (st.client_id, st.client_secret, st.tenant):
            return 401, {"error": "invalid_client", "error_description": "Invalid client credentials or tenant"}
        token = secrets.token_urlsafe(24)
        st.tokens[token] = time.monotonic() + st.token_ttl
        st.calls["tokens_issued"] += 1
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": int(st.token_ttl),
                     "scope": get("scope") or "all"}

    # --- the API (under the state's lock) -------------------------------------------------
    def _apply(self, operation: str, ticket_id: Any, body: Any, query: str) -> Reply:
        st = self.server.state
        if operation == "list_statuses":
            return 200, [{"id": sid, "name": n, "type": 1 if closed else 0, "inactive": False}
                         for sid, (n, closed) in st.boards[0].items()]
        q = urllib.parse.parse_qs(query)
        if operation == "list_notes":
            ticket_id = _int(q.get("ticket_id", [""])[0])
        ticket = st.tickets.get(ticket_id) if isinstance(ticket_id, int) else None
        if ticket is None and st.auto_create_tickets and isinstance(ticket_id, int):
            st.add_ticket(ticket_id)
            ticket = st.tickets[ticket_id]
        if ticket is None:
            return 404, "Ticket not found"
        if operation == "get_ticket":
            return 200, _ticket_json(st, ticket)
        if operation == "update_status":
            return _update(st, ticket, body)
        if operation == "post_note":
            return _post_action(ticket, body)
        return _list_actions(ticket, q)


def _route(method: str, path: str) -> tuple[str, int | None] | None:
    if (m := re.fullmatch(r"/api/Tickets/(\d+)", path)) and method == "GET":
        return "get_ticket", int(m.group(1))
    if path == "/api/Tickets" and method == "POST":
        return "update_status", None
    if path == "/api/Actions":
        return {"POST": ("post_note", None), "GET": ("list_notes", None)}.get(method)
    if path == "/api/Status" and method == "GET":
        return "list_statuses", None
    return None


def _ticket_json(st: HaloState, ticket: dict[str, Any], status_id: int | None = None) -> dict[str, Any]:
    sid = ticket["status_id"] if status_id is None else status_id
    name, closed = st.boards[0].get(sid, ("?", False))
    body = {"id": ticket["id"], "summary": f"Ticket {ticket['id']}", "status_id": sid, "status_name": name,
            "hasbeenclosed": closed, "tickettype_id": 1, "client_id": 12}
    if st.omit_status_name:
        del body["status_name"]
    return body


def _update(st: HaloState, ticket: dict[str, Any], body: Any) -> Reply:
    if not isinstance(body, list) or len(body) != 1 or not isinstance(body[0], dict):
        return 400, "The request body must be an array of tickets."
    status = body[0].get("status_id")
    if not isinstance(status, int) or status not in st.boards[0]:
        return 400, f"Invalid status_id {status!r:.20}."
    ticket["patches"] += 1
    if not ticket["reject_status_changes"]:
        ticket["status_id"] = status
    return 201, _ticket_json(st, ticket, status)  # the reply claims the new status either way


def _post_action(ticket: dict[str, Any], body: Any) -> Reply:
    if not isinstance(body, list) or len(body) != 1 or not isinstance(body[0], dict):
        return 400, "The request body must be an array of actions."
    a = body[0]
    if not str(a.get("note") or "").strip():
        return 400, "A note is required."
    action_id = _new_action(ticket, {"note": a["note"], "hiddenfromuser": bool(a.get("hiddenfromuser")),
                                     "outcome": str(a.get("outcome") or "Note"),
                                     "sendemail": bool(a.get("sendemail")), "who": "API"})
    return 201, dict(ticket["notes"][-1], id=action_id)


def _list_actions(ticket: dict[str, Any], q: dict[str, list[str]]) -> Reply:
    rows = sorted(ticket["notes"], key=lambda n: n["id"], reverse=True)  # newest first, like Halo's UI
    if q.get("pageinate", ["false"])[0] == "true":
        size = max(min(_int(q.get("page_size", ["50"])[0]) or 50, 100), 1)
        page = max(_int(q.get("page_no", ["1"])[0]) or 1, 1)
        rows_page = rows[(page - 1) * size: page * size]
    else:
        rows_page = rows
    return 200, {"record_count": len(rows), "actions": [dict(r) for r in rows_page]}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _error_body(status: int) -> Any:
    if status == 429:
        return "Too many requests, please slow down."
    if status == 401:
        return {"message": "Unauthorized"}
    return f"Simulated server error {status}"


class HaloSimulator(QuietServer):
    thread_name = "halo-simulator"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, state: HaloState | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.state = state or HaloState()

    @property
    def base_url(self) -> str:
        return self.root_url


def main(argv: list[str] | None = None) -> None:
    run_main(HaloSimulator, "HaloPSA", argv)


if __name__ == "__main__":
    main()
