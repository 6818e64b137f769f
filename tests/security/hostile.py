"""Hostile PSA servers: real HTTP servers on loopback that answer the way a tenant's broken
or malicious PSA might (huge, compressed, slow, redirecting, with forged strings)."""
from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from providers.simulators import LoopbackServer

Reply = Callable[[BaseHTTPRequestHandler], None]


class HostileServer(LoopbackServer):
    """Every request is recorded (method, path, headers, body) and answered by `reply`."""
    thread_name = "hostile-psa"

    def __init__(self, reply: Reply, host: str = "127.0.0.1") -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, 0), _Handler)
        self.reply = reply
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hung up on us: that is the point of most of these servers


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                     "body": body, "client": self.client_address})
        self.server.reply(self)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

    def log_message(self, *args: Any) -> None:
        pass


def send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    merged = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
    for key, value in merged.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    data = json.dumps(payload).encode()
    return lambda h: send(h, status, data, headers)


_bombs: dict[int, bytes] = {}


def gzip_bomb(inflated_mb: int) -> bytes:
    """A gzip body of `inflated_mb` MiB of zeros, about 1/1000 of that on the wire: one
    member of 1 MiB repeated (a gzip stream may hold many members), quick to build."""
    if inflated_mb not in _bombs:
        _bombs[inflated_mb] = gzip.compress(bytes(1024 * 1024), compresslevel=9) * inflated_mb
    return _bombs[inflated_mb]


def gzip_reply(payload: bytes) -> Reply:
    return lambda h: send(h, 200, payload, {"Content-Encoding": "gzip"})


def dribble(status: int, data: bytes, every: float, *, in_headers: bool = False) -> Reply:
    """Send `data` one byte every `every` seconds: in the body (declared length), or as a
    never-ending header block, so no single socket read ever waits long enough to time out."""
    def reply(h: BaseHTTPRequestHandler) -> None:
        try:
            if in_headers:
                h.wfile.write(f"HTTP/1.1 {status} OK\r\nX-Slow: ".encode())
                for i in range(1, 10_000):
                    h.wfile.write(b"\r\nX-Slow: " if i % 40 == 0 else b"X")  # never a blank line
                    time.sleep(every)
                return
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            for i in range(len(data)):
                h.wfile.write(data[i:i + 1])
                time.sleep(every)
        except OSError:
            pass  # cut off by the client, as it should be
    return reply


def plain(status: int, text: str, content_type: str = "text/html") -> Reply:
    return lambda h: send(h, status, text.encode(), {"Content-Type": content_type})
