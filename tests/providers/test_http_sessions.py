"""The worker's per-connection HTTP sessions stay bounded as tenants grow (issue 14): at most
PSA_HTTP_MAX_SESSIONS sessions and their sockets, idle ones closed, a busy one kept with its
keep-alive socket. A real keep-alive HTTP server on loopback; sockets counted from /proc."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from providers import http
from tests import harness


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client socket stays open in its pool
    seen: list[dict] = []  # the request headers, per call

    def do_GET(self) -> None:  # noqa: N802
        _Handler.seen.append(dict(self.headers))
        body = json.dumps({"id": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "planted=by-the-psa; Path=/")  # a hostile PSA's state
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server(monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "127.0.0.1")
    http.close_sessions()
    yield srv.server_address[1]
    http.close_sessions()
    srv.shutdown()
    srv.server_close()


def client_sockets(port: int) -> int:
    """Open TCP sockets of this process connected to `port` (the client ends)."""
    return harness.established_to(port)


def get(port: int, tenant: int) -> dict:
    base = f"http://127.0.0.1:{port}/t{tenant}/v4_6_release/apis/3.0"
    session = http.pooled_session(f"cw|{base}|fake-token-{tenant}|fake-client", base)
    return http.call(session, "GET", f"{base}/service/tickets/1", provider="connectwise", operation="get_ticket",
                     headers={"Authorization": "Basic ZmFrZTpmYWtl"})


def test_thousand_connections_leave_at_most_the_cap(server, monkeypatch):
    monkeypatch.setenv("PSA_HTTP_MAX_SESSIONS", "50")
    for tenant in range(1000):
        assert get(server, tenant) == {"id": 1}
    assert http.session_count() == 50
    # each connection made one call: one keep-alive socket per session still open, none of the evicted
    assert client_sockets(server) == 50


def test_pool_holds_what_one_connection_can_use(server, monkeypatch):
    monkeypatch.delenv("PSA_HTTP_POOL_SIZE", raising=False)
    monkeypatch.setenv("WORKER_CONCURRENCY", "32")
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "8")
    assert http.pool_size() == 8
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "0")  # no cap: the worker's threads
    assert http.pool_size() == 32
    monkeypatch.setenv("PSA_HTTP_POOL_SIZE", "3")
    assert http.pool_size() == 3
    monkeypatch.delenv("PSA_HTTP_POOL_SIZE")
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "8")
    get(server, 1)
    session = http.pooled_session(f"cw|http://127.0.0.1:{server}/t1/v4_6_release/apis/3.0|fake-token-1|fake-client",
                                  "http://x")
    assert session.get_adapter("http://127.0.0.1/")._pool_maxsize == 8


def test_idle_session_is_closed_and_a_reused_connection_still_works(server, monkeypatch):
    monkeypatch.setenv("PSA_HTTP_IDLE_SECONDS", "0.3")
    base = f"http://127.0.0.1:{server}/t7/v4_6_release/apis/3.0"
    assert get(server, 7) == {"id": 1}
    first = http.pooled_session(f"cw|{base}|fake-token-7|fake-client", base)
    assert client_sockets(server) == 1
    import time
    time.sleep(0.5)
    assert get(server, 8) == {"id": 1}  # any look-up sweeps the idle ones
    assert http.session_count() == 1
    assert client_sockets(server) == 1  # tenant 7's socket was closed with its session
    assert get(server, 7) == {"id": 1}  # evicted, then used again: a new session, working
    assert http.pooled_session(f"cw|{base}|fake-token-7|fake-client", base) is not first


def test_busy_connection_keeps_its_session_and_socket(server, monkeypatch):
    monkeypatch.setenv("PSA_HTTP_MAX_SESSIONS", "10")
    base = f"http://127.0.0.1:{server}/t0/v4_6_release/apis/3.0"
    get(server, 0)
    busy = http.pooled_session(f"cw|{base}|fake-token-0|fake-client", base)
    for tenant in range(1, 200):
        get(server, tenant)
        if tenant % 5 == 0:
            assert get(server, 0) == {"id": 1}  # the busy tenant, every 5th call
    assert http.pooled_session(f"cw|{base}|fake-token-0|fake-client", base) is busy
    pools = list(busy.get_adapter(base).poolmanager.pools._container.values())
    assert [p.num_connections for p in pools] == [1]  # one socket opened for all its calls: keep-alive kept
    assert client_sockets(server) <= 10


def test_calls_send_our_headers_and_never_a_cookie_the_psa_set(server):
    _Handler.seen.clear()
    assert get(server, 3) == {"id": 1}
    assert get(server, 3) == {"id": 1}  # same session, same keep-alive socket
    first, second = _Handler.seen[-2:]
    for headers in (first, second):
        assert headers["Authorization"] == "Basic ZmFrZTpmYWtl"  # the provider's own header
        assert "gzip" in headers["Accept-Encoding"]  # requests' defaults still apply
        assert headers["User-Agent"].startswith("python-requests/")
    assert "Cookie" not in second  # the Set-Cookie of the first reply was not stored
    base = f"http://127.0.0.1:{server}/t3/v4_6_release/apis/3.0"
    assert len(http.pooled_session(f"cw|{base}|fake-token-3|fake-client", base).cookies) == 0
