"""A ConnectWise Manage simulator: a real HTTP server on loopback, quirks included.

Serves the endpoints the worker uses under any `.../apis/3.0` prefix, checks auth the way
CW does (Basic company+public:private, a clientId header), and injects faults:

- `reject_status_changes` on a ticket: PATCH answers 200 with the new status in its body,
  but the stored status stays put (the "silent rejection" we exist to catch);
- rules matched per operation, `times` times: `error` (status + CW error body +
  Retry-After, after `seconds` if set; nothing is applied), `delay` (sleep *before*
  applying), `drop_after_apply` (apply, then close the socket without a reply),
  `slow_after_apply` (apply, then sleep past the client's timeout), `chaos` (a random
  share of calls fail as 5xx/429/drop/slow);
- `latency`: seconds added to every call (benchmarks); `path_latency` overrides it for
  requests whose path starts with a given prefix (one simulator serving many tenants'
  "hosts" by path, `/t<n>/v4_6_release/...`, can give one of them a slow PSA);
- `in_flight` / `max_in_flight`: API requests being served now (from the request read to its
  reply's first byte), and the most at once.

Control it in-process (`SimulatorServer.state`) or over HTTP under `/_sim/` (the demo and
benchmarks run it as a separate process: `python -m providers.simulators.connectwise`).
"""
from __future__ import annotations

import base64
import datetime as dt
import random
import re
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from providers.simulators.common import FaultingHandler, QuietServer, Reply, run_main

DEFAULT_STATUSES = {1: ("New", False), 5: ("In Progress", False), 7: ("Escalated", False),
                    9: ("Resolved", True), 11: ("Closed", True)}


@dataclass
class FaultRule:
    action: str  # error | delay | drop_after_apply | slow_after_apply | dribble_after_apply | chaos
    operation: str = "any"  # get_ticket | update_status | post_note | list_notes | list_statuses | any
    times: int = 1  # -1 = forever
    ticket_id: int | None = None
    status: int = 503
    retry_after: float | None = None
    seconds: float = 0.0
    rate: float = 0.0
    body: dict[str, Any] | None = None


@dataclass
class SimState:
    company_id: str = "simco"
    public_key: str = "fake-public"
    private_key: str = "fake-private"
    client_id: str = "00000000-0000-0000-0000-00000000c11e"
    latency: float = 0.0
    # path prefix -> seconds per call instead of `latency` (the longest matching prefix wins)
    path_latency: dict[str, float] = field(default_factory=dict)
    auto_create_tickets: bool = False  # benchmarks: any ticket id exists, in status 1 on board 1
    boards: dict[int, dict[int, tuple[str, bool]]] = field(default_factory=lambda: {1: dict(DEFAULT_STATUSES)})
    tickets: dict[int, dict[str, Any]] = field(default_factory=dict)
    faults: list[FaultRule] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)
    # API requests being served right now, and the most at once (tests of the in-flight cap)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    next_note_id: int = 1000
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def add_ticket(self, ticket_id: int, *, board_id: int = 1, status_id: int = 1,
                   reject_status_changes: bool = False) -> None:
        with self.lock:
            self.tickets[ticket_id] = {"id": ticket_id, "board_id": board_id, "status_id": status_id,
                                       "notes": [], "reject_status_changes": reject_status_changes,
                                       "patches": 0}

    def add_fault(self, **kwargs: Any) -> FaultRule:
        rule = FaultRule(**kwargs)
        with self.lock:
            self.faults.append(rule)
        return rule

    def add_note(self, ticket_id: int, text: str, *, internal: bool = False) -> int:
        """A note written by someone else (a technician, another integration)."""
        with self.lock:
            self.next_note_id += 1
            self.tickets[ticket_id]["notes"].append({
                "id": self.next_note_id, "ticketId": ticket_id, "text": text, "detailDescriptionFlag": not internal,
                "internalAnalysisFlag": internal, "resolutionFlag": False, "internalFlag": internal,
                "externalFlag": not internal, "createdBy": "someone-else",
                "dateCreated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
            return self.next_note_id

    def notes(self, ticket_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(n) for n in self.tickets[ticket_id]["notes"]]

    def status_of(self, ticket_id: int) -> int:
        with self.lock:
            return self.tickets[ticket_id]["status_id"]

    def latency_for(self, path: str) -> float:
        with self.lock:
            matches = [prefix for prefix in self.path_latency if path.startswith(prefix)]
            return self.path_latency[max(matches, key=len)] if matches else self.latency

    def take_fault(self, operation: str, ticket_id: int | None) -> FaultRule | None:
        with self.lock:
            for rule in self.faults:
                if rule.operation not in ("any", operation) or rule.times == 0:
                    continue
                if rule.ticket_id is not None and rule.ticket_id != ticket_id:
                    continue
                if rule.action == "chaos":
                    if self.rng.random() >= rule.rate:
                        continue
                    return self._chaos_pick(rule, operation)
                if rule.times > 0:
                    rule.times -= 1
                return rule
        return None

    def _chaos_pick(self, rule: FaultRule, operation: str) -> FaultRule:
        choices = ["error500", "error503", "error429", "drop_after_apply", "slow_after_apply"]
        pick = self.rng.choice(choices)
        if pick.startswith("error"):
            code = int(pick[5:])
            return FaultRule(action="error", status=code, retry_after=0.2 if code == 429 else None)
        return FaultRule(action=pick, seconds=rule.seconds)


class _Handler(FaultingHandler):
    counts_in_flight = True
    server: "SimulatorServer"

    def dispatch(self, method: str, path: str, query: str, body: Any) -> None:
        api = re.sub(r"^.*?/apis/3\.0", "", path)
        route = _route(method, api)
        if route is None:
            return self.send(404, {"code": "NotFound", "message": f"no route {method} {api}"})
        operation, ticket_id, board_id = route
        return self.serve(operation, ticket_id, authorised=self._authorised,
                          apply=lambda: self._apply(operation, ticket_id, board_id, body, query), error_body=_error_body)

    def latency(self) -> float:
        return self.server.state.latency_for(self.path.partition("?")[0])

    def _authorised(self) -> Reply | None:
        state = self.server.state
        expected = base64.b64encode(f"{state.company_id}+{state.public_key}:{state.private_key}".encode()).decode()
        if (self.headers.get("Authorization") == f"Basic {expected}"
                and self.headers.get("clientId") == state.client_id
                and "application/vnd.connectwise.com+json" in (self.headers.get("Accept") or "")):
            return None
        return 401, {"code": "Unauthorized", "message": "Invalid credentials or clientId"}

    # --- the API (runs under the state's lock) ----------------------------------------------
    def _apply(self, operation: str, ticket_id: int | None, board_id: int | None, body: Any,
               query: str) -> Reply:
        state = self.server.state
        if operation == "list_statuses":
            statuses = state.boards.get(board_id or -1)
            if statuses is None:
                return 404, {"code": "NotFound", "message": f"Service Board {board_id} not found"}
            return 200, [{"id": sid, "name": n, "closedStatus": c, "inactive": False,
                          "board": {"id": board_id}} for sid, (n, c) in statuses.items()]
        ticket = state.tickets.get(ticket_id or -1)
        if ticket is None and state.auto_create_tickets and ticket_id:
            state.add_ticket(ticket_id)
            ticket = state.tickets[ticket_id]
        if ticket is None:
            return 404, {"code": "NotFound", "message": f"Ticket {ticket_id} not found"}
        if operation == "get_ticket":
            return 200, _ticket_json(state, ticket)
        if operation == "update_status":
            return self._patch(state, ticket, body)
        if operation == "post_note":
            return self._post_note(state, ticket, body)
        return _list_notes(ticket["notes"], query)

    def _patch(self, state: SimState, ticket: dict[str, Any], body: Any) -> tuple[int, Any]:
        ops = body if isinstance(body, list) else None
        op = next((o for o in ops or [] if isinstance(o, dict) and o.get("path") in ("status/id", "status")), None)
        if op is None:
            return 400, {"code": "InvalidObject", "message": "ticket object is invalid",
                         "errors": [{"code": "InvalidPatch", "message": "path source is not valid",
                                     "resource": "ticket", "field": "status/id"}]}
        value = op.get("value")
        status_id = value.get("id") if isinstance(value, dict) else value
        statuses = state.boards[ticket["board_id"]]
        if not isinstance(status_id, int) or status_id not in statuses:
            return 400, {"code": "InvalidObject", "message": "ticket object is invalid",
                         "errors": [{"code": "NotFound", "resource": "ticket", "field": "status/id",
                                     "message": f"Service Status {status_id} not found for Service Board {ticket['board_id']}"}]}
        ticket["patches"] += 1
        if ticket["reject_status_changes"]:
            # Answer as if it worked; a board workflow "undoes" it behind our back.
            return 200, {**_ticket_json(state, ticket), "status": _status_ref(state, ticket["board_id"], status_id)}
        ticket["status_id"] = status_id
        return 200, _ticket_json(state, ticket)

    def _post_note(self, state: SimState, ticket: dict[str, Any], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not str(body.get("text") or "").strip():
            return 400, {"code": "InvalidObject", "message": "serviceNote object is invalid",
                         "errors": [{"code": "MissingRequiredField", "message": "text is required",
                                     "resource": "serviceNote", "field": "text"}]}
        flags = [bool(body.get(f)) for f in ("detailDescriptionFlag", "internalAnalysisFlag", "resolutionFlag")]
        if not any(flags):
            return 400, {"code": "InvalidObject", "message": "serviceNote object is invalid",
                         "errors": [{"code": "MissingRequiredField", "field": "detailDescriptionFlag",
                                     "message": "One of detailDescriptionFlag, internalAnalysisFlag, or resolutionFlag is required."}]}
        state.next_note_id += 1
        note = {"id": state.next_note_id, "ticketId": ticket["id"], "text": body["text"],
                "detailDescriptionFlag": flags[0], "internalAnalysisFlag": flags[1], "resolutionFlag": flags[2],
                "customerUpdatedFlag": bool(body.get("customerUpdatedFlag")),
                "processNotifications": body.get("processNotifications", True),
                "dateCreated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "createdBy": state.public_key, "internalFlag": flags[1], "externalFlag": not flags[1]}
        ticket["notes"].append(note)
        return 201, dict(note)

    def control(self, method: str, path: str, body: Any) -> None:
        """The shared /_sim/ API, and /_sim/config: benchmarks (bench/throughput.py) change the
        latency of this simulator, which they run as a separate process, between runs."""
        if (path, method) != ("/_sim/config", "POST"):
            return super().control(method, path, body)
        state = self.server.state
        body = body if isinstance(body, dict) else {}
        with state.lock:
            if "latency" in body:
                state.latency = float(body["latency"])
            if "path_latency" in body:
                state.path_latency = {str(k): float(v) for k, v in (body["path_latency"] or {}).items()}
            if body.get("clear_faults"):
                state.faults.clear()
        return self.send(200, {"ok": True})


def _route(method: str, api: str) -> tuple[str, int | None, int | None] | None:
    if m := re.fullmatch(r"/service/tickets/(\d+)", api):
        return {"GET": ("get_ticket", int(m.group(1)), None), "PATCH": ("update_status", int(m.group(1)), None)}.get(method)
    if m := re.fullmatch(r"/service/tickets/(\d+)/notes", api):
        return {"GET": ("list_notes", int(m.group(1)), None), "POST": ("post_note", int(m.group(1)), None)}.get(method)
    if (m := re.fullmatch(r"/service/boards/(\d+)/statuses", api)) and method == "GET":
        return ("list_statuses", None, int(m.group(1)))
    return None


def _status_ref(state: SimState, board_id: int, status_id: int) -> dict[str, Any]:
    name = state.boards[board_id].get(status_id, ("?", False))[0]
    return {"id": status_id, "name": name, "_info": {"status_href": f"/service/boards/{board_id}/statuses/{status_id}"}}


def _ticket_json(state: SimState, ticket: dict[str, Any]) -> dict[str, Any]:
    closed = state.boards[ticket["board_id"]].get(ticket["status_id"], ("", False))[1]
    return {"id": ticket["id"], "recordType": "ServiceTicket", "closedFlag": closed,
            "board": {"id": ticket["board_id"], "name": f"Board {ticket['board_id']}"},
            "status": _status_ref(state, ticket["board_id"], ticket["status_id"]),
            "_info": {"lastUpdated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}}


def _list_notes(notes: list[dict[str, Any]], query: str) -> tuple[int, Any]:
    """orderBy id asc|desc, page/pageSize, and the one condition we use: `id > N`."""
    q = urllib.parse.parse_qs(query)
    condition = q.get("conditions", [""])[0].strip()
    if condition:
        m = re.fullmatch(r"id\s*>\s*(\d+)", condition)
        if m is None:
            return 400, {"code": "InvalidObject", "message": f"the simulator does not support conditions={condition!r}"}
        notes = [n for n in notes if n["id"] > int(m.group(1))]
    notes = sorted(notes, key=lambda n: n["id"], reverse="desc" in q.get("orderBy", [""])[0])
    size, page = _page_size(query), max(int(q.get("page", ["1"])[0]), 1)
    return 200, notes[(page - 1) * size: page * size]


def _page_size(query: str) -> int:
    m = re.search(r"pageSize=(\d+)", query)
    return min(int(m.group(1)), 1000) if m else 25


def _error_body(status: int) -> dict[str, Any]:
    if status == 429:
        return {"code": "TooManyRequests", "message": "Request volume exceeds capacity limits"}
    if status == 409:
        return {"code": "RecordInUse", "message": "The record is currently in use by another member"}
    if status == 401:
        return {"code": "Unauthorized", "message": "Invalid credentials"}
    if status == 403:
        return {"code": "Security", "message": "You do not have security permission to perform this action."}
    if status == 404:
        return {"code": "NotFound", "message": "The record was not found"}
    return {"code": "ConnectWiseApi", "message": f"Simulated server error {status}", "errors": None}


class SimulatorServer(QuietServer):
    thread_name = "cw-simulator"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, state: SimState | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.state = state or SimState()

    @property
    def base_url(self) -> str:
        return self.root_url + "/v4_6_release/apis/3.0"


def main(argv: list[str] | None = None) -> None:
    run_main(SimulatorServer, "ConnectWise", argv)


if __name__ == "__main__":
    main()
