"""An Autotask PSA (REST ATServicesRest/V1.0) simulator on loopback, quirks included.

Serves what providers.autotask uses, under any `.../V1.0` prefix: ZoneInformation, Tickets
(GET by id, sparse PATCH), ticket notes (POST as a child of the ticket, query), and the
entityInformation/fields picklists. Checks the three auth headers, keeps per-tenant
picklists (ids unlike ConnectWise's on purpose), refuses a business rule as HTTP 500 with
an `errors` array, and refuses a fourth concurrent request the way Autotask's thread
limiting does. Fault rules and `reject_status_changes` work as in the ConnectWise one.

Run it alone: `python -m providers.simulators.autotask` (or `psa-writeback simulator
--provider autotask`); control it over HTTP under `/_sim/` like the ConnectWise one.
"""
from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from providers.simulators.common import FaultingHandler, QuietServer, Reply, run_main
from providers.simulators.connectwise import SimState

# A tenant's own ids: not ConnectWise's 9/7, and not Autotask's documented defaults either.
TENANT_STATUSES = {1: ("New", False), 8: ("In Progress", False), 13: ("Escalated to Tier 2", False),
                   5: ("Complete", True), 21: ("Waiting Customer", False)}
NOTE_TYPES = {1: "Task Summary", 2: "Task Detail", 3: "Task Notes", 13: "Workflow Rule Note"}
PUBLISH = {1: "All Autotask Users", 2: "Internal Project Team", 4: "Internal & Co-Managed"}
THREAD_LIMIT = 3


@dataclass
class AutotaskState(SimState):
    integration_code: str = "FAKE-INTEGRATION-CODE"
    username: str = "api-user@simco.example"
    secret: str = "fake-autotask-secret"
    zone_name: str = "Sim Zone 5"
    require_titles: bool = True
    thread_limit: int = THREAD_LIMIT
    in_flight: int = 0
    boards: dict[int, dict[int, tuple[str, bool]]] = field(default_factory=lambda: {0: dict(TENANT_STATUSES)})
    next_note_id: int = 29683000  # Autotask ids are large and global across tickets

    def add_ticket(self, ticket_id: int, *, board_id: int = 0, status_id: int = 1,
                   reject_status_changes: bool = False) -> None:
        super().add_ticket(ticket_id, board_id=0, status_id=status_id, reject_status_changes=reject_status_changes)

    def add_note(self, ticket_id: int, text: str, *, internal: bool = False) -> int:
        with self.lock:
            self.next_note_id += 1
            self.tickets[ticket_id]["notes"].append({
                "id": self.next_note_id, "ticketID": ticket_id, "title": "Technician note", "description": text,
                "noteType": 3, "publish": 2 if internal else 1, "creatorResourceID": 29682885,
                "createDateTime": _now()})
            return self.next_note_id


class _Handler(FaultingHandler):
    server: "AutotaskSimulator"

    def dispatch(self, method: str, path: str, query: str, body: Any) -> None:
        api = re.sub(r"^.*?/V1\.0", "", path)
        if api == "/ZoneInformation" and method == "GET":  # exempt from auth and thread limits
            return self._zone(query)
        route = _route(method, api)
        if route is None:
            return self.send(404, {"errors": [f"no route {method} {api}"]})
        operation, ticket_id = route
        state = self.server.state
        with state.lock:
            state.in_flight += 1
            over = state.in_flight > state.thread_limit
        try:
            if over:
                state.calls["thread_limited"] += 1
                return self.send(429, {"errors": [
                    f"Thread threshold of {state.thread_limit} threads exceeded for this endpoint and "
                    "integration. Please wait for requests to complete before sending more."]})
            return self.serve(operation, ticket_id, authorised=self._authorised,
                              apply=lambda: self._apply(operation, ticket_id, body, api), error_body=_error_body)
        finally:
            with state.lock:
                state.in_flight -= 1

    def _authorised(self) -> Reply | None:
        st = self.server.state
        if (self.headers.get("ApiIntegrationCode") == st.integration_code
                and self.headers.get("UserName") == st.username and self.headers.get("Secret") == st.secret):
            return None
        return 401, {"errors": ["Unauthorized: the user name, secret or integration code is not valid"]}

    def _zone(self, query: str) -> None:
        st = self.server.state
        user = urllib.parse.parse_qs(query).get("user", [""])[0]
        if user != st.username:
            return self.send(404, {"errors": [f"Zone information could not be determined for user {user!r:.80}"]})
        return self.send(200, {"zoneName": st.zone_name, "url": self.server.root_url + "/ATServicesRest/",
                               "webUrl": self.server.root_url + "/", "ci": 5})

    # --- the API (runs under the state's lock) ------------------------------------------------
    def _apply(self, operation: str, ticket_id: int | None, body: Any, api: str) -> Reply:
        st = self.server.state
        if operation == "list_statuses":
            return 200, _fields(api.split("/")[1], st)
        if operation == "update_status":
            ticket_id = body.get("id") if isinstance(body, dict) else None
        if operation == "list_notes":
            return _query_notes(st, body)
        ticket = st.tickets.get(ticket_id if isinstance(ticket_id, int) else -1)
        if ticket is None and st.auto_create_tickets and isinstance(ticket_id, int):
            st.add_ticket(ticket_id)
            ticket = st.tickets[ticket_id]
        if operation == "get_ticket":
            return 200, {"item": _ticket_json(ticket) if ticket else None}
        if ticket is None:
            return 500, {"errors": [f"Ticket {ticket_id!r:.20} does not exist or is not accessible."]}
        if operation == "update_status":
            return _patch(st, ticket, body)
        return _post_note(st, ticket, body)


def _route(method: str, api: str) -> tuple[str, int | None] | None:
    if (m := re.fullmatch(r"/Tickets/(\d+)", api)) and method == "GET":
        return "get_ticket", int(m.group(1))
    if api == "/Tickets" and method == "PATCH":
        return "update_status", None
    if (m := re.fullmatch(r"/Tickets/(\d+)/Notes", api)) and method == "POST":
        return "post_note", int(m.group(1))
    if api == "/TicketNotes/query" and method == "POST":
        return "list_notes", None
    if api in ("/Tickets/entityInformation/fields", "/TicketNotes/entityInformation/fields") and method == "GET":
        return "list_statuses", None
    return None


def _picklist_field(name: str, values: dict[int, str]) -> dict[str, Any]:
    return {"name": name, "dataType": "integer", "isPickList": True, "isRequired": True, "picklistValues": [
        {"value": str(v), "label": label, "isDefaultValue": False, "sortOrder": i, "isActive": True,
         "isSystem": v in (1, 5)} for i, (v, label) in enumerate(values.items())]}


def _fields(entity: str, st: AutotaskState) -> dict[str, Any]:
    plain = {"name": "id", "dataType": "long", "isPickList": False, "isRequired": True}
    if entity == "Tickets":
        return {"fields": [plain, _picklist_field("status", {v: n for v, (n, _) in st.boards[0].items()})]}
    return {"fields": [plain, _picklist_field("noteType", NOTE_TYPES), _picklist_field("publish", PUBLISH)]}


def _ticket_json(ticket: dict[str, Any]) -> dict[str, Any]:
    return {"id": ticket["id"], "ticketNumber": f"T20261201.{ticket['id']:04d}", "status": ticket["status_id"],
            "queueID": 29682833, "companyID": 0, "lastActivityDate": _now(), "userDefinedFields": []}


def _patch(st: AutotaskState, ticket: dict[str, Any], body: Any) -> Reply:
    if not isinstance(body, dict) or set(body) - {"id", "status"}:
        # Sparse updates only: a full entity trips unrelated validations (Anteris-Dev #70).
        return 500, {"errors": ["companyLocationID: the location does not belong to the ticket's company."]}
    status = body.get("status")
    if not isinstance(status, int) or status not in st.boards[0]:
        return 500, {"errors": [f"Value {status!r:.20} is not a valid picklist value for field status."]}
    ticket["patches"] += 1
    if not ticket["reject_status_changes"]:
        ticket["status_id"] = status
    return 200, {"itemId": ticket["id"]}


def _post_note(st: AutotaskState, ticket: dict[str, Any], body: Any) -> Reply:
    if not isinstance(body, dict):
        return 500, {"errors": ["The request body could not be read."]}
    problems = []
    if not str(body.get("description") or "").strip():
        problems.append("description is required.")
    if st.require_titles and not str(body.get("title") or "").strip():
        problems.append("Ticket note titles are required for this ticket category.")
    if body.get("noteType") not in NOTE_TYPES:
        problems.append(f"Value {body.get('noteType')!r:.20} is not a valid picklist value for field noteType.")
    if body.get("publish") not in PUBLISH:
        problems.append(f"Value {body.get('publish')!r:.20} is not a valid picklist value for field publish.")
    if problems:
        return 500, {"errors": problems}
    st.next_note_id += 1
    ticket["notes"].append({"id": st.next_note_id, "ticketID": ticket["id"], "title": body.get("title"),
                            "description": body["description"], "noteType": body["noteType"],
                            "publish": body["publish"], "creatorResourceID": 29682885, "createDateTime": _now()})
    return 200, {"itemId": st.next_note_id}


def _conditions(flt: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in flt if isinstance(flt, list) else []:
        if isinstance(c, dict) and c.get("op") == "and":
            out += _conditions(c.get("items"))
        elif isinstance(c, dict):
            out.append(c)
    return out


def _query_notes(st: AutotaskState, body: Any) -> Reply:
    """The one query shape we use: ticketID eq N and id gt M, MaxRecords up to 500."""
    if not isinstance(body, dict):
        return 500, {"errors": ["The query could not be read."]}
    ticket_id, after = None, 0
    for c in _conditions(body.get("filter")):
        if (c.get("op"), c.get("field")) == ("eq", "ticketID"):
            ticket_id = c.get("value")
        elif (c.get("op"), c.get("field")) == ("gt", "id"):
            after = int(c.get("value"))
        else:
            return 500, {"errors": [f"the simulator does not support the condition {c!r:.80}"]}
    ticket = st.tickets.get(ticket_id) if isinstance(ticket_id, int) else None
    size = min(int(body.get("MaxRecords") or 500), 500)
    notes = sorted((n for n in (ticket or {}).get("notes", []) if n["id"] > after), key=lambda n: n["id"])[:size]
    return 200, {"items": [dict(n) for n in notes],
                 "pageDetails": {"count": len(notes), "requestCount": size, "prevPageUrl": None, "nextPageUrl": None}}


def _error_body(status: int) -> dict[str, Any]:
    if status == 429:
        return {"errors": ["API request threshold exceeded: please slow down."]}
    if status == 401:
        return {"errors": ["Unauthorized"]}
    return {}  # a bare 5xx: Autotask's infrastructure, not a business rule (transient)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AutotaskSimulator(QuietServer):
    thread_name = "autotask-simulator"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, state: AutotaskState | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.state = state or AutotaskState()

    @property
    def zone_lookup_url(self) -> str:
        """Where `ZoneInformation` is asked (webservices2.autotask.net in production)."""
        return self.root_url + "/ATServicesRest/V1.0"

    @property
    def base_url(self) -> str:
        return self.root_url + "/ATServicesRest/V1.0"


def main(argv: list[str] | None = None) -> None:
    run_main(AutotaskSimulator, "Autotask", argv)


if __name__ == "__main__":
    main()
