"""What the simulators share: a request handler that counts calls, adds latency, checks
auth and applies the fault rules of providers.simulators.connectwise (same knobs, same
`add_fault(...)` API) around the vendor-specific work, the `/_sim/` control API, and the
server it runs in."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from providers.simulators import LoopbackServer

Reply = tuple[int, Any]


class FaultingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real thing
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per call), a delay no real PSA adds.
    disable_nagle_algorithm = True
    # Count served API requests in state.in_flight / max_in_flight (the tests of the in-flight
    # cap read ConnectWise's). Off by default: Autotask's state keeps its thread limit there.
    counts_in_flight = False
    server: Any
    _counted = False

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        body = self.read_body()
        if path.startswith("/_sim/"):
            return self.control(method, path, body)
        return self.dispatch(method, path, query, body)

    def dispatch(self, method: str, path: str, query: str, body: Any) -> None:
        """The vendor's API: route the request, answer what needs no auth, `serve` the rest."""
        raise NotImplementedError

    def read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def send(self, status: int, payload: Any, headers: dict[str, str] | None = None, dribble: float = 0.0) -> None:
        data = json.dumps(payload).encode()
        self._leave()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not dribble:
            self.wfile.write(data)
            return
        for i in range(len(data)):  # one byte at a time: no single read ever times out
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(dribble)

    def serve(self, operation: str, ticket_id: Any, *, authorised: Callable[[], Reply | None],
              apply: Callable[[], Reply], error_body: Callable[[int], Any]) -> None:
        """Count the call (and, if counts_in_flight, the request in flight), add latency, check
        auth (`authorised` returns a refusal or None), then the fault rules around `apply`
        (which runs under the state's lock)."""
        state = self.server.state
        with state.lock:
            state.calls[operation] += 1
            if self.counts_in_flight:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                self._counted = True
        try:
            return self._serve(operation, ticket_id, authorised, apply, error_body)
        finally:
            self._leave()

    def latency(self) -> float:
        """Seconds added before this request is served (ConnectWise's may depend on its path)."""
        return self.server.state.latency

    def _leave(self) -> None:
        """The request stops counting as in flight: before its reply is written (see send),
        else at the latest when serve returns (a dropped reply). Counting until after the
        write would let a caller that has its reply, and has handed its in-flight slot to the
        next job, overlap that job's first request here: a measure of the cap must never see
        more than the callers could have had in flight."""
        if self._counted:
            self._counted = False
            with self.server.state.lock:
                self.server.state.in_flight -= 1

    def _serve(self, operation: str, ticket_id: Any, authorised: Callable[[], Reply | None],
               apply: Callable[[], Reply], error_body: Callable[[int], Any]) -> None:
        state = self.server.state
        if latency := self.latency():
            time.sleep(latency)
        refusal = authorised()
        if refusal is not None:
            return self.send(*refusal)
        rule = state.take_fault(operation, ticket_id)
        if rule is not None and rule.action == "error":
            if rule.seconds:
                time.sleep(rule.seconds)  # a slow failure: keeps the caller busy, then refuses
            return self.send(rule.status, rule.body or error_body(rule.status),
                             {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None)
        if rule is not None and rule.action == "delay":
            time.sleep(rule.seconds)
        with state.lock:
            status, reply = apply()
        if rule is not None and rule.action == "drop_after_apply":
            self.close_connection = True
            self._leave()
            self.connection.shutdown(2)  # the write happened; the reply never arrives
            return None
        if rule is not None and rule.action == "slow_after_apply":
            time.sleep(rule.seconds)
        if rule is not None and rule.action == "dribble_after_apply":
            return self.send(status, reply, dribble=rule.seconds)  # applied; the reply crawls
        return self.send(status, reply)

    # --- the control API for out-of-process users (the demo, benchmarks) -------------------
    def control(self, method: str, path: str, body: Any) -> None:
        st = self.server.state
        body = body if isinstance(body, dict) else {}
        if path == "/_sim/tickets" and method == "POST":
            # board_id is ConnectWise's; the other simulators' states have one board and ignore it
            st.add_ticket(int(body["id"]), board_id=int(body.get("board_id", 1)),
                          status_id=int(body.get("status_id", 1)),
                          reject_status_changes=bool(body.get("reject_status_changes", False)))
            return self.send(201, {"id": int(body["id"])})
        if path == "/_sim/faults" and method == "POST":
            st.add_fault(**body)
            return self.send(201, {"ok": True})
        if (m := re.fullmatch(r"/_sim/tickets/(\d+)", path)) and method == "GET":
            with st.lock:
                t = st.tickets.get(int(m.group(1)))
                return self.send(200 if t else 404, dict(t) if t else {"message": "no such ticket"})
        if path == "/_sim/stats" and method == "GET":
            with st.lock:
                peak = {"max_in_flight": st.max_in_flight} if self.counts_in_flight else {}
                return self.send(200, {"calls": dict(st.calls), **peak,
                                       "notes": sum(len(t["notes"]) for t in st.tickets.values())})
        return self.send(404, {"message": f"no control route {method} {path}"})


class QuietServer(LoopbackServer):
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (read timeout) or a fault that dropped the socket: expected.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    @property
    def root_url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"


def run_main(server_cls: Callable[..., Any], vendor: str, argv: list[str] | None = None) -> None:
    """`python -m providers.simulators.<vendor>` for every simulator: serve on loopback until
    interrupted; stdout's first line is the JSON address, which scripts and the CLI read."""
    parser = argparse.ArgumentParser(description=f"Run the {vendor} simulator on loopback.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every call")
    parser.add_argument("--auto-tickets", action="store_true", help="create unknown tickets on first use")
    args = parser.parse_args(argv)
    server = server_cls(port=args.port)
    server.state.latency = args.latency
    server.state.auto_create_tickets = args.auto_tickets
    print(json.dumps({"base_url": server.base_url, "root_url": server.root_url}), flush=True)
    server.serve_until_interrupted()
