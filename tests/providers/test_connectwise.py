"""The ConnectWise provider against the simulator over real HTTP, and the error mapping."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from models.enums import NoteVisibility
from providers import Credentials, UnknownProviderError, provider_for
from providers import errors as E


@pytest.fixture()
def cw(sim):
    st = sim.state
    st.add_ticket(1)
    return provider_for("connectwise", Credentials(sim.base_url, st.company_id, st.client_id, st.public_key,
                                                   st.private_key))


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_GET(self):
        _Recorder.seen.append({"path": self.path, "headers": dict(self.headers)})
        data = json.dumps({"id": 5, "status": {"id": 1, "name": "New"}, "board": {"id": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_sends_basic_auth_client_id_and_pinned_version():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        creds = Credentials(f"http://127.0.0.1:{server.server_address[1]}/v4_6_release/apis/3.0", "acme",
                            "client-guid", "fakepub", "fakepriv")
        ticket = provider_for("connectwise", creds).get_ticket(5)
    finally:
        server.shutdown()
    [req] = _Recorder.seen
    assert req["path"].startswith("/v4_6_release/apis/3.0/service/tickets/5?fields=")
    assert req["headers"]["Authorization"] == "Basic " + base64.b64encode(b"acme+fakepub:fakepriv").decode()
    assert req["headers"]["clientId"] == "client-guid"
    assert req["headers"]["Accept"].startswith("application/vnd.connectwise.com+json; version=")
    assert (ticket.id, ticket.status_id, ticket.status_name, ticket.board_id) == (5, 1, "New", 2)


def test_the_environment_is_read_once_and_netrc_never_replaces_our_credentials(monkeypatch, tmp_path):
    # a ~/.netrc entry for the PSA's host, and a proxy the PSA's host is exempt from
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login netrc-user password netrc-fake-pass\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen.clear()
    try:
        creds = Credentials(f"http://127.0.0.1:{server.server_address[1]}/apis/3.0", "netrcco", "client-guid",
                            "fakepub2", "fakepriv2")
        provider_for("connectwise", creds).get_ticket(5)
        monkeypatch.setenv("NO_PROXY", "")  # read at the session's creation, not per call
        provider_for("connectwise", creds).get_ticket(5)
    finally:
        server.shutdown()
    assert [r["headers"]["Authorization"] for r in _Recorder.seen] == [
        "Basic " + base64.b64encode(b"netrcco+fakepub2:fakepriv2").decode()] * 2


@pytest.mark.parametrize("visibility,flags", [
    (NoteVisibility.RESOLUTION, (False, False, True)),
    (NoteVisibility.INTERNAL, (False, True, False)),
    (NoteVisibility.DISCUSSION, (True, False, False)),
])
def test_note_visibility_maps_to_exactly_one_flag(cw, sim, visibility, flags):
    note = cw.post_note(1, "hello", visibility)
    [stored] = sim.state.notes(1)
    assert (stored["detailDescriptionFlag"], stored["internalAnalysisFlag"], stored["resolutionFlag"]) == flags
    assert stored["customerUpdatedFlag"] is False
    if visibility is NoteVisibility.INTERNAL:
        assert stored["processNotifications"] is False  # an internal note never emails anyone
    assert note.visibility is visibility and note.id == str(stored["id"])


def test_list_recent_notes_newest_first(cw):
    for text in ("a", "b", "c"):
        cw.post_note(1, text, NoteVisibility.INTERNAL)
    assert [n.text for n in cw.list_recent_notes(1, 2)] == ["c", "b"]


def test_list_notes_after_reads_every_newer_note_across_pages_oldest_first(cw, sim):
    ids = [sim.state.add_note(1, f"note {i}") for i in range(2345)]
    before = sim.state.calls["list_notes"]
    newer = cw.list_notes_after(1, str(ids[99]))
    assert [n.id for n in newer] == [str(i) for i in ids[100:]]  # 2,245 notes: three pages of 1,000
    assert sim.state.calls["list_notes"] - before == 3
    assert cw.list_notes_after(1, str(ids[-1])) == []
    assert [n.text for n in cw.list_notes_after(1, "0")][:2] == ["note 0", "note 1"]
    with pytest.raises(ValueError, match="integers"):
        cw.list_notes_after(1, "abc")


def test_silent_rejection_patch_says_ok_but_reread_disagrees(cw, sim):
    sim.state.tickets[1]["reject_status_changes"] = True
    assert cw.update_status(1, 9).status_id == 9  # what the PATCH reply claims
    assert cw.get_ticket(1).status_id == 1  # what is true


def test_wrong_credentials_are_an_auth_error(sim):
    sim.state.add_ticket(1)
    st = sim.state
    bad = provider_for("connectwise", Credentials(sim.base_url, st.company_id, st.client_id, st.public_key, "nope"))
    with pytest.raises(E.PsaAuthError) as info:
        bad.get_ticket(1)
    assert not info.value.retryable and "HTTP 401" in str(info.value)


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(UnknownProviderError, match="unknown PSA provider 'zendesk'; known: autotask, connectwise, halo"):
        provider_for("zendesk", Credentials("http://x", "a", "b", "c", "d"))


def test_credentials_repr_hides_keys():
    text = repr(Credentials("http://x", "acme", "cid", "pubkey-123", "privkey-456"))
    assert "privkey-456" not in text and "pubkey-123" not in text


@pytest.mark.parametrize("status,cls,retryable", [
    (400, E.PsaBadRequest, False), (401, E.PsaAuthError, False), (403, E.PsaPermissionDenied, False),
    (404, E.PsaNotFound, False), (409, E.PsaRecordBusy, True), (429, E.PsaRateLimited, True),
    (500, E.PsaTransientError, True), (503, E.PsaTransientError, True),
])
def test_from_response_maps_status_codes(status, cls, retryable):
    err = E.from_response(status, {"code": "X", "message": "vendor says"}, {"Retry-After": "7"}, operation="op")
    assert type(err) is cls and err.retryable is retryable
    assert "vendor says" in str(err) and f"HTTP {status}" in str(err)
    if status in (409, 429, 500, 503):
        assert err.retry_after == 7.0


def test_from_response_recognises_a_status_from_another_board():
    body = {"code": "InvalidObject", "message": "ticket object is invalid", "errors": [
        {"code": "NotFound", "message": "Service Status 17 not found for Service Board 21", "field": "status/id"}]}
    err = E.from_response(400, body)
    assert isinstance(err, E.PsaInvalidStatus)
    assert "Service Status 17 not found for Service Board 21" in str(err)


def test_retry_after_in_http_date_form_is_ignored_not_fatal():
    assert E.from_response(429, "slow down", {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}).retry_after is None


def test_list_notes_after_pages_by_key_so_a_deletion_between_reads_skips_nothing(cw, sim, monkeypatch):
    ids = [sim.state.add_note(1, f"note {i}") for i in range(2345)]
    real_call, queries = cw._call, []

    def call_then_delete(method, path, operation, **kwargs):
        queries.append(dict(kwargs.get("params") or {}))
        body = real_call(method, path, operation, **kwargs)
        if len(queries) == 1:  # someone deletes a note we already read, before our next page
            with sim.state.lock:
                sim.state.tickets[1]["notes"] = [n for n in sim.state.tickets[1]["notes"] if n["id"] != ids[150]]
        return body

    monkeypatch.setattr(cw, "_call", call_then_delete)
    newer = cw.list_notes_after(1, str(ids[99]))
    assert [n.id for n in newer] == [str(i) for i in ids[100:]]  # page one was read before the deletion
    assert [(q["conditions"], q["page"]) for q in queries] == [
        (f"id > {ids[99]}", 1), (f"id > {ids[1099]}", 1), (f"id > {ids[2099]}", 1)]


def test_list_notes_after_refuses_to_guess_beyond_the_page_cap(cw, sim, monkeypatch):
    from providers import connectwise

    monkeypatch.setattr(connectwise, "NOTE_PAGES_MAX", 2)
    ids = [sim.state.add_note(1, f"note {i}") for i in range(2001)]
    before = sim.state.calls["list_notes"]
    with pytest.raises(E.PsaProtocolError, match="more than 2000 notes newer than note 0"):
        cw.list_notes_after(1, "0")
    assert sim.state.calls["list_notes"] - before == 2
    assert len(cw.list_notes_after(1, str(ids[1]))) == 1999  # under the cap: read in full


def test_the_simulator_can_give_one_tenants_path_its_own_latency(sim):
    # given one simulator serving two tenants' "hosts" by path, and a latency for one path
    import time

    st = sim.state
    st.add_ticket(7)
    root, _, api = sim.base_url.partition("/v4_6_release")

    def timed_get(prefix: str) -> float:
        creds = Credentials(f"{root}{prefix}/v4_6_release{api}", st.company_id, st.client_id, st.public_key,
                            st.private_key)
        t0 = time.monotonic()
        provider_for("connectwise", creds).get_ticket(7)
        return time.monotonic() - t0

    st.path_latency = {"/tslow/": 0.4}
    # then only that tenant's calls wait; the other's (and a prefix that merely starts alike) do not
    assert timed_get("/tslow") >= 0.4
    assert timed_get("/tfast") < 0.3
    assert timed_get("/tslower") < 0.3


def test_a_malformed_id_in_a_reply_is_the_psas_protocol_error_not_our_configuration(cw, sim):
    # a reply the PSA got wrong must be retried as the PSA's fault, never fail the job as
    # "configuration error" (ValueError) or crash as an internal error (TypeError)
    for body in ({"id": "abc"}, {"id": None}, {"id": True}):
        sim.state.add_fault(action="error", status=200, operation="get_ticket", body=body)
        with pytest.raises(E.PsaProtocolError, match="no integer id"):
            cw.get_ticket(1)
    sim.state.add_fault(action="error", status=200, operation="list_statuses", body=[{"id": "x", "name": "New"}])
    with pytest.raises(E.PsaProtocolError, match="no integer id"):
        cw.list_statuses(1)
