"""What the Autotask and Halo simulators share with each other: a request handler that
checks auth, takes the fault rules of providers.simulators.connectwise (same knobs, same
`add_fault(...)` API) and applies them around the vendor-specific work."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from providers.simulators import LoopbackServer

Reply = tuple[int, Any]


class FaultingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # see providers.simulators.connectwise._Handler
    server: Any

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def dispatch(self, method: str) -> None:
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

    def send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def serve(self, operation: str, ticket_id: int | None, *, authorised: Callable[[], Reply | None],
              apply: Callable[[], Reply], error_body: Callable[[int], Any]) -> None:
        """Count the call, add latency, check auth (`authorised` returns a refusal or None),
        then the fault rules around `apply` (which runs under the state's lock)."""
        state = self.server.state
        with state.lock:
            state.calls[operation] += 1
        if state.latency:
            time.sleep(state.latency)
        refusal = authorised()
        if refusal is not None:
            return self.send(*refusal)
        rule = state.take_fault(operation, ticket_id)
        if rule is not None and rule.action == "error":
            if rule.seconds:
                time.sleep(rule.seconds)
            return self.send(rule.status, rule.body or error_body(rule.status),
                             {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None)
        if rule is not None and rule.action == "delay":
            time.sleep(rule.seconds)
        with state.lock:
            status, reply = apply()
        if rule is not None and rule.action == "drop_after_apply":
            self.close_connection = True
            self.connection.shutdown(2)  # the write happened; the reply never arrives
            return None
        if rule is not None and rule.action == "slow_after_apply":
            time.sleep(rule.seconds)
        return self.send(status, reply)


class QuietServer(LoopbackServer):
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
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
