"""Reply limits (issue 11 §1-2): size cap on decoded bytes, a wall-clock deadline per call, no
redirects. Each hostile PSA is a real HTTP server on loopback; calls go through providers.http."""
from __future__ import annotations

import json
import time

from tests.security.conftest import psa_call, raises_kind
from tests.security.hostile import dribble, gzip_bomb, gzip_reply, json_reply, send


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_a_gzip_bomb_is_cut_at_the_decoded_limit_without_inflating_it(hostile):
    bomb = gzip_bomb(400)  # ~400 KB on the wire, 400 MiB once inflated
    server = hostile(gzip_reply(bomb))
    peak_before = _peak_rss_mb()
    started = time.monotonic()
    with raises_kind("response_too_large") as info:
        psa_call(server.url + "/service/tickets/1/notes", operation="list_notes")
    assert time.monotonic() - started < 3
    assert "PSA_MAX_RESPONSE_BYTES" in str(info.value) and "4194304" in str(info.value)
    assert not info.value.retryable
    # Reading the whole reply would have raised this process's peak by ~400 MB.
    assert _peak_rss_mb() - peak_before < 60


def test_a_declared_content_length_over_the_limit_is_refused_before_reading(hostile):
    def huge(h):  # declares 5 GB, sends a little, then holds the connection open
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(5 * 1024 ** 3))
        h.end_headers()
        h.wfile.write(b"[" * 1000)
        time.sleep(6)

    server = hostile(huge)
    started = time.monotonic()
    with raises_kind("response_too_large") as info:
        psa_call(server.url + "/service/tickets/1")
    assert time.monotonic() - started < 1.5  # not read: no read timeout was waited for
    assert "Content-Length" in str(info.value) and "PSA_MAX_RESPONSE_BYTES" in str(info.value)


def test_a_plain_body_over_a_configured_limit_is_cut(hostile, monkeypatch):
    monkeypatch.setenv("PSA_MAX_RESPONSE_BYTES", "65536")
    big = json.dumps([{"id": i, "text": "x" * 100} for i in range(2000)]).encode()  # ~230 KB, no gzip

    def chunked(h):  # no Content-Length: only counting what arrives can stop it
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for i in range(0, len(big), 8192):
            piece = big[i:i + 8192]
            h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    server = hostile(chunked)
    with raises_kind("response_too_large") as info:
        psa_call(server.url + "/service/tickets/1/notes", operation="list_notes")
    assert "65536" in str(info.value)
    small = hostile(json_reply(200, {"id": 1}))
    assert psa_call(small.url + "/service/tickets/1") == {"id": 1}  # under the limit: read as usual


def test_a_server_dribbling_its_body_is_cut_at_the_call_deadline(hostile, monkeypatch):
    monkeypatch.setenv("PSA_READ_TIMEOUT", "1")
    monkeypatch.setenv("PSA_CALL_DEADLINE_SECONDS", "1.5")
    server = hostile(dribble(200, json.dumps({"id": 1, "summary": "s" * 40}).encode(), every=0.3))
    started = time.monotonic()
    with raises_kind("deadline") as info:
        psa_call(server.url + "/service/tickets/1")
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 0.5, f"call took {elapsed:.1f}s against a 1.5s deadline"
    assert "PSA_CALL_DEADLINE_SECONDS" in str(info.value) and "1.5 s" in str(info.value)
    assert info.value.retryable and info.value.operation == "get_ticket"


def test_a_server_dribbling_its_headers_is_cut_at_the_call_deadline(hostile, monkeypatch):
    monkeypatch.setenv("PSA_READ_TIMEOUT", "1")
    monkeypatch.setenv("PSA_CALL_DEADLINE_SECONDS", "1.5")
    server = hostile(dribble(200, b"", every=0.2, in_headers=True))
    started = time.monotonic()
    with raises_kind("deadline"):
        psa_call(server.url + "/service/tickets/1/notes", "POST", operation="post_note", json={"text": "hi"})
    assert time.monotonic() - started < 1.5 + 0.5


def test_a_dribbled_reply_without_a_length_is_not_taken_as_complete(hostile, monkeypatch):
    monkeypatch.setenv("PSA_CALL_DEADLINE_SECONDS", "1")

    def close_delimited(h):  # HTTP/1.0 style: the body ends when the server closes
        h.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
        for byte in b'{"id": 1, "status": {"id": 9, "name": "Resolved"}}':
            h.wfile.write(bytes([byte]))
            time.sleep(0.1)

    server = hostile(close_delimited)
    with raises_kind("deadline"):
        psa_call(server.url + "/service/tickets/1")


def test_a_redirect_is_never_followed_and_the_other_host_gets_nothing(hostile):
    catcher = hostile(json_reply(200, {"id": 77, "text": "stolen"}))
    redirector = hostile(lambda h: send(h, 307, b"", {"Location": catcher.url + "/steal?token=SECRET-LOCATION"}))
    with raises_kind("redirect") as info:
        psa_call(redirector.url + "/service/tickets/1/notes", "POST", operation="post_note",
                 json={"text": "customer note body"})
    assert info.value.status_code == 307 and not info.value.retryable
    assert "SECRET-LOCATION" not in str(info.value) and catcher.url not in str(info.value)
    assert catcher.seen == []  # no note body, no clientId, no Authorization went there
    assert [r["method"] for r in redirector.seen] == ["POST"]


def test_limits_leave_ordinary_replies_and_keep_alive_alone(hostile):
    server = hostile(json_reply(200, {"id": 5, "status": {"id": 1, "name": "New"}}))
    url = server.url + "/service/tickets/5"
    from providers.http import call, pooled_session

    session = pooled_session("security-test|keepalive", url)
    for _ in range(3):
        assert call(session, "GET", url, provider="connectwise", operation="get_ticket", headers={}) == {
            "id": 5, "status": {"id": 1, "name": "New"}}
    # One connection, opened (and its address checked) once, then kept alive.
    assert len(server.seen) == 3 and len({r["client"] for r in server.seen}) == 1


def test_the_job_lease_outlasts_a_call_cut_at_its_deadline(monkeypatch):
    # A POST may take up to the deadline and still land: a successor execution may only
    # start (and look for the note) once that call is over, so the lease must outlast it.
    from tasks.store import lease_seconds, min_lease_seconds

    monkeypatch.setenv("PSA_CONNECT_TIMEOUT", "5")
    monkeypatch.setenv("PSA_READ_TIMEOUT", "3")
    assert min_lease_seconds() == 5 + 3 + 3 + 1  # default deadline: connect + read
    monkeypatch.setenv("PSA_CALL_DEADLINE_SECONDS", "60")
    monkeypatch.setenv("JOB_LEASE_SECONDS", "20")
    assert min_lease_seconds() == 60 + 3 + 1 and lease_seconds() == 64
