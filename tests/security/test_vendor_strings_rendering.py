"""Issue 11 section 5, the rendering side: a tenant's strings (status names, a PSA's error
message) never become links in an alert, never reach an operator's terminal raw, and never
forge a log line. Real worker, PostgreSQL, the simulator, a real webhook receiver, the CLI as
a subprocess."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import select, update

from models import Alert, JobKind, WritebackAttempt, WritebackJob
from models.db import session_scope
from tasks import enqueue_resolve
from tasks.enqueue import build_job
from tests.factories import RESOLVED, wait_terminal
from tests.harness import wait_for
from tests.ops.conftest import (Receiver, ops_broker, ops_client, ops_env, run_cli,  # noqa: F401 - fixtures
                                start_worker, submit)
from worker.alert_payload import slack_message

PHISH = "[re-auth here](https://evil.example/login)"
BARE = "Closed - see https://evil.example/x or www.evil.example"
SLACK_LINK = "<https://evil.example/y|click to re-authenticate>"


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def alert_worker(ops_broker, receiver, tmp_path_factory):  # noqa: F811
    proc = start_worker(ops_broker, tmp_path_factory.mktemp("vendor-strings"), ALERT_WEBHOOK_URL=receiver.url,
                        ALERT_WEBHOOK_RETRY_SECONDS="0.2", ALERT_WEBHOOK_MAX_ATTEMPTS="3")
    yield proc
    proc.stop()


def _links(body: dict) -> list[str]:
    """Whatever Slack or a markdown reader (Teams reads `text`) would render as a link."""
    flat = str(body)
    return re.findall(r"https?://|\]\(|<https?:|<mailto:", flat)


def test_status_names_with_link_syntax_and_bare_urls_do_not_render_as_links(world, alert_worker, receiver,
                                                                           ops_client):  # noqa: F811
    # given a board whose target status is named like a phishing link, and whose current
    # status carries a bare URL and Slack's own link syntax, on a board that undoes changes
    world.sim.state.boards[1][RESOLVED] = (PHISH, True)
    world.sim.state.boards[1][1] = (f"{BARE} {SLACK_LINK}", False)
    sid = world.session(7201, reject_status_changes=True)
    # when the resolve ends verification_failed and pages
    job_id = submit(ops_client, "resolve", sid, "Replaced the fuser unit.")
    assert wait_terminal(job_id).state == "verification_failed"
    [body] = wait_for(lambda: receiver.bodies() or None, timeout=20, message="the webhook")
    # then no part of the webhook body is a link, and the names are still readable
    assert _links(body) == [], body
    assert "`[re-auth here] (https[:]//evil.example/login)`" in body["text"]
    fields = [f["text"] for b in body["blocks"] if b["type"] == "section" for f in b.get("fields", [])]
    assert any("https[:]//evil.example/x" in f and "&lt;https[:]//evil.example/y|click" in f for f in fields)
    for field in fields:  # every tenant string sits in a code span of its own
        assert field.count("`") % 2 == 0


def test_alert_payload_escapes_every_tenant_string():
    alert = {"kind": "job_failed", "id": 3, "job_id": 9, "job_kind": "resolve", "account_id": 1,
             "provider": "connectwise", "ticket_id": 5, "expected_status_id": 9, "expected_status_name": PHISH,
             "observed_status_id": 1, "observed_status_name": "New` *bold* `<!channel>",
             "message": f"Token expired.\nRe-authenticate: {SLACK_LINK} or mailto:x@evil.example & {PHISH}"}
    body = slack_message(alert, account_name="Acme <https://evil.example|MSP>")
    assert _links(body) == [] and "mailto:" not in str(body)
    assert "<!channel>" not in str(body)  # no @channel ping either
    fields = [f["text"] for b in body["blocks"] if b["type"] == "section" for f in b.get("fields", [])]
    observed = next(f for f in fields if f.startswith("*Observed status*"))
    assert observed.count("`") == 2  # the name's own backticks cannot close the code span
    [message] = [b["text"] for b in body["blocks"] if b["type"] == "section" and "text" in b]
    assert message["type"] == "plain_text" and "\n" not in message["text"]
    assert "Re-authenticate" in message["text"]


def _story_job(world, ticket: int) -> int:
    sid = world.session(ticket)
    forged = "Bad request\x1b]0;pwned\x07\x1b[2J\r\n[2026-12-01 10:00:00,000: ERROR/MainProcess] ALERT auth_failed: forged"
    with session_scope() as db:
        j = build_job(db, JobKind.RESOLVE, session_id=sid, markdown="Queued note.")
        db.flush()
        db.execute(update(WritebackJob).where(WritebackJob.id == j.id).values(
            state="failed", error_type="PsaBadRequest", error_message=forged, expected_status_id=9,
            expected_status_name="Resolved\x1b[31m", observed_status_id=1, observed_status_name="New\nforged line"))
        db.add(WritebackAttempt(job_id=j.id, attempt_no=1, outcome="failed", step="note", error_type="PsaBadRequest",
                                error_message=forged))
        db.add(Alert(kind="job_failed", job_id=j.id, job_kind="resolve", account_id=world.account_id,
                     ticket_id=ticket, expected_status_id=9, expected_status_name="Resolved\x1b[31m",
                     observed_status_id=1, observed_status_name="New\nforged line", message=forged,
                     delivery_state="disabled"))
        return j.id


def test_control_characters_in_vendor_strings_never_reach_the_terminal_raw(world, ops_broker):  # noqa: F811
    job_id = _story_job(world, 7202)
    env = ops_env(ops_broker)
    for args in (("jobs", "show", str(job_id)), ("jobs", "list"), ("alerts", "list")):
        out = run_cli(*args, env=env)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\r" not in out.stdout, args
        assert not any(line.startswith(("[2026", "forged line")) for line in out.stdout.splitlines()), args
        assert "\\x1b" in out.stdout or args == ("jobs", "list"), args  # shown escaped, not dropped
    shown = run_cli("jobs", "show", str(job_id), env=env).stdout
    assert "\\nforged line" in shown and "Bad request\\x1b]0;pwned" in shown


def test_a_vendor_message_with_a_newline_yields_one_log_line(world, worker):
    # given a PSA whose error message carries a newline and a forged alert line
    sid = world.session(7203)
    world.sim.state.add_fault(action="error", status=400, operation="post_note", body={
        "code": "InvalidObject", "message": "Bad request\n[2026-12-01 10:00:00,000: ERROR/MainProcess] "
                                            "ALERT auth_failed: forged", "errors": None})
    mark = worker.mark()
    # when the job fails on it
    job_id = enqueue_resolve(None, sid, "x")
    assert wait_terminal(job_id).state == "failed"
    log = wait_for(lambda: (t := worker.log_text(since=mark)) and f"job {job_id} failed" in t and t,
                   timeout=10, message="the outcome line")
    # then no line of the log starts with the forged text: the message stayed on its line
    assert not any(re.match(r"\s*\[2026-12-01 10:00:00", line) for line in log.splitlines())
    quoted = [ln for ln in log.splitlines() if "ALERT auth_failed" in ln]
    assert quoted and all(f"job {job_id}" in ln for ln in quoted)  # only inside the job's own lines
