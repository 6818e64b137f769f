"""Vendor strings at the provider boundary (issue 11 §2 error bodies, §5 first bullet): control
characters stripped from everything a PSA says, and a non-JSON body never copied."""
from __future__ import annotations

import json

from models.enums import NoteVisibility
from providers import Credentials, provider_for
from providers.text import clean_line, clean_text
from tests.security.conftest import psa_call, raises_kind
from tests.security.hostile import HostileServer, json_reply, plain, send

FORGED = "bad request\n2026-12-01 ALERT auth_failed account=1\x1b[2J\x1b]8;;https://evil\x07\u202egnp.exe\x85end"


def _provider(server: HostileServer):
    return provider_for("connectwise", Credentials(server.url + "/v4_6_release/apis/3.0", "acme", "fake-client",
                                                   "fake-pub", "fake-priv"))


def test_a_vendor_error_message_loses_its_control_characters(hostile):
    server = hostile(json_reply(400, {"code": "Invalid\nObject\x1b[31m", "message": FORGED,
                                      "errors": [{"code": "X", "message": "field\r\nforged", "field": "text"}]}))
    with raises_kind("bad_request") as info:
        psa_call(server.url + "/service/tickets/1/notes", "POST", operation="post_note", json={"text": "x"})
    text = str(info.value)
    assert not any(ch in text for ch in "\n\r\x1b\x07\x85\u202e")
    assert "bad request 2026-12-01 ALERT auth_failed account=1" in text  # still readable, on one line
    assert "(field forged)" in text and info.value.vendor_code == "Invalid Object[31m"


def test_a_non_json_error_body_is_not_copied_into_the_error(hostile):
    banner = "-ERR unknown command 'GET', redis_version:7.2.4 SECRET-BANNER"
    for status in (400, 404, 502):
        server = hostile(plain(status, f"<html><body>{banner}</body></html>"))
        with raises_kind("bad_request" if status == 400 else "not_found" if status == 404 else "transient") as info:
            psa_call(server.url + "/service/tickets/1")
        assert "SECRET-BANNER" not in str(info.value) and "redis_version" not in str(info.value)
        assert f"HTTP {status}" in str(info.value)


def test_a_json_error_message_is_kept_for_the_user(hostile):
    server = hostile(json_reply(403, {"code": "Security",
                                      "message": "You do not have security permission to perform this action."}))
    with raises_kind("permission") as info:
        psa_call(server.url + "/service/tickets/1")
    assert "You do not have security permission to perform this action." in str(info.value)


def test_status_names_and_note_text_are_cleaned_but_note_lines_survive(hostile):
    ticket = {"id": 5, "status": {"id": 9, "name": "Resolved\r\nALERT verification_failed\x1b[0m" + "x" * 400},
              "board": {"id": 1}}
    note = {"id": 77, "text": "line one\n\tline two\x1b[31m\x00", "internalAnalysisFlag": True}

    def reply(h):
        send(h, 200, json.dumps(ticket if "/notes" not in h.path else [note]).encode())

    server = hostile(reply)
    cw = _provider(server)
    name = cw.get_ticket(5).status_name
    assert name.startswith("Resolved ALERT verification_failed[0m") and len(name) <= 200
    assert not any(ch in name for ch in "\r\n\x1b")
    [listed] = cw.list_recent_notes(5)
    assert listed.text == "line one\n\tline two[31m" and listed.visibility is NoteVisibility.INTERNAL


def test_clean_line_and_clean_text_rules():
    assert clean_line("a\r\n\tb\u2028c\x00\x9b\u2066d") == "a b cd"
    assert clean_line("x" * 500, 10) == "xxxxxxx..."
    assert clean_text("a\r\nb\tc\x1b\x7f\x9f") == "a\r\nb\tc"
    assert clean_text("שלום \u200f ok") == "שלום \u200f ok"  # right-to-left text is text
