"""A fake Anthropic Messages API: a real HTTP server on loopback for the real `anthropic` SDK.

Point the SDK at it with `base_url` (or ANTHROPIC_BASE_URL). It answers `POST /v1/messages`
the way the API does: a `message` object with text content and usage, or an error body
`{"type": "error", "error": {"type": ..., "message": ...}}` with the matching status
(400 invalid_request_error, 401 authentication_error, 429 rate_limit_error with
`retry-after`, 500 api_error, 529 overloaded_error) and a `request-id` header.

Replies are scripted per test, in order (`reply_text`, `reply_error`); when the script is
empty the `responder` callable answers (by default: a 500 that says the script ran out,
so a test that sends more requests than it expected fails loudly). Every request is
recorded (path, lower-cased headers, JSON body, arrival time) for assertions.

Quirk kept on purpose: the API accepts a key as `x-api-key` or `Authorization: Bearer`
(SDK 2.x sends the latter); a request with neither gets the API's 401 body.
"""
from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from providers.simulators import LoopbackServer

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "api_error", 529: "overloaded_error"}


@dataclass(frozen=True)
class Reply:
    status: int = 200
    text: str = ""
    input_tokens: int = 100
    output_tokens: int = 50
    stop_reason: str = "end_turn"
    error_type: str | None = None
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (timeouts, ordering)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() on arrival

    @property
    def user_texts(self) -> list[str]:
        """The text of every user turn, content blocks flattened (what the model reads)."""
        return [_text_of(m.get("content")) for m in self.body.get("messages", []) if m.get("role") == "user"]

    @property
    def system_text(self) -> str:
        return _text_of(self.body.get("system"))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if isinstance(b, dict))


def _script_exhausted(request: RecordedRequest) -> Reply:
    return Reply(status=500, error_type="api_error", message="fake Anthropic: no scripted reply left for this request")


class FakeAnthropic(LoopbackServer):
    thread_name = "fake-anthropic"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.script: list[Reply] = []
        self.responder: Callable[[RecordedRequest], Reply] = _script_exhausted
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    # --- control (tests) --------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def reply_text(self, text: str, **opts: Any) -> None:
        with self.lock:
            self.script.append(Reply(text=text, **opts))

    def reply_error(self, status: int, message: str = "", *, retry_after: float | None = None,
                    error_type: str | None = None, **opts: Any) -> None:
        headers = dict(opts.pop("headers", {}))
        if retry_after is not None:
            headers["retry-after"] = f"{retry_after:g}"
        with self.lock:
            self.script.append(Reply(status=status, error_type=error_type or ERROR_TYPES.get(status, "api_error"),
                                     message=message or f"simulated {status}", headers=headers, **opts))

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.script.clear()
            self.responder = _script_exhausted

    def messages_requests(self) -> list[RecordedRequest]:
        with self.lock:
            return [r for r in self.requests if r.path == "/v1/messages"]


    # --- serving -----------------------------------------------------------------------
    def next_reply(self, request: RecordedRequest) -> Reply:
        with self.lock:
            self.requests.append(request)
            if self.script:
                return self.script.pop(0)
            responder = self.responder
        return responder(request)

    def message_body(self, request: RecordedRequest, reply: Reply) -> dict[str, Any]:
        return {"id": f"msg_fake_{next(self._ids):06d}", "type": "message", "role": "assistant",
                "model": request.body.get("model"), "content": [{"type": "text", "text": reply.text}],
                "stop_reason": reply.stop_reason, "stop_sequence": None,
                "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeAnthropic

    def log_message(self, *args: Any) -> None:  # quiet: tests read the recorded requests instead
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return self._error(Reply(status=400, error_type="invalid_request_error", message="body is not JSON"))
        request = RecordedRequest("POST", self.path.partition("?")[0], {k.lower(): v for k, v in self.headers.items()},
                                  body, time.monotonic())
        if request.path != "/v1/messages":
            return self._error(Reply(status=404, error_type="not_found_error", message=f"no route {request.path}"))
        problem = _request_problem(request)
        if problem is not None:
            with self.server.lock:
                self.server.requests.append(request)
            return self._error(problem)
        reply = self.server.next_reply(request)
        if reply.delay:
            time.sleep(reply.delay)
        if reply.status != 200:
            return self._error(reply)
        self._send(200, self.server.message_body(request, reply), reply.headers)

    def _error(self, reply: Reply) -> None:
        self._send(reply.status, {"type": "error", "error": {"type": reply.error_type or "api_error",
                                                              "message": reply.message}}, reply.headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("request-id", f"req_fake_{next(self.server._ids):06d}")
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and went away
            pass


def _request_problem(request: RecordedRequest) -> Reply | None:
    """The checks the real API makes before it runs the model, with its error bodies."""
    h = request.headers
    if not h.get("x-api-key") and not h.get("authorization", "").startswith("Bearer "):
        return Reply(status=401, error_type="authentication_error", message="x-api-key header is required")
    if not h.get("anthropic-version"):
        return Reply(status=400, error_type="invalid_request_error", message="anthropic-version header is required")
    body = request.body
    if not isinstance(body, dict):
        return Reply(status=400, error_type="invalid_request_error", message="body must be a JSON object")
    for key, kind in (("model", str), ("max_tokens", int), ("messages", list)):
        if not isinstance(body.get(key), kind):
            return Reply(status=400, error_type="invalid_request_error", message=f"{key}: Field required")
    if not body["messages"] or body["messages"][0].get("role") != "user":
        return Reply(status=400, error_type="invalid_request_error", message="messages: first message must be user")
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake Anthropic Messages API on loopback.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--text", default="", help="the reply to every request once the script is empty")
    args = parser.parse_args(argv)
    server = FakeAnthropic(port=args.port)
    if args.text:
        server.responder = lambda _request: Reply(text=args.text)
    print(json.dumps({"base_url": server.base_url}), flush=True)
    server.serve_until_interrupted()


if __name__ == "__main__":
    main()
